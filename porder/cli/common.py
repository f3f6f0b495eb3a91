"""Helpers shared by porder's click commands: error mapping, interruption, progress."""
from __future__ import annotations

import signal
import sys
import time
from contextlib import contextmanager

import click

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@contextmanager
def library_errors(prefix: str = ""):
    """Turn library errors into one-line click errors (exit 1), no traceback.

    ``prefix`` starts the message (e.g. ``"rank 1: "`` for a process of a torchrun job).
    """
    try:
        yield
    except click.ClickException:
        raise
    except (ValueError, OSError) as e:
        line = str(e).splitlines()[0] if str(e) else repr(e)
        raise click.ClickException(prefix + line) from None


class ProgressReporter:
    """A tqdm bar on a terminal; plain periodic lines otherwise (CI logs).

    Rates count only the work of this run: the first ``done`` of a stage (rows
    a resumed run had already written, shards already finished) is its base.
    ``work`` maps each stage to the images this run processed in it.
    """

    def __init__(self, enabled: bool | None = None, every: float = 10.0):
        self.tty = sys.stderr.isatty() if enabled is None else enabled
        self.every = every
        self.bar = None
        self.split = None
        self.base = 0
        self.last = 0.0
        self.t0 = time.perf_counter()
        self.work: dict[str, int] = {}

    def __call__(self, split: str, done: int, total: int) -> None:
        if split != self.split:
            self.close()
            self.split, self.base = split, done
            self.t0 = self.last = time.perf_counter()
            self.work[split] = 0
            if self.tty:
                from tqdm import tqdm  # its rate already leaves out `initial`

                self.bar = tqdm(total=total, initial=done, desc=split, unit="img",
                                dynamic_ncols=True, leave=True)
            else:
                click.echo(f"{split}: {done}/{total} images ({100 * done / max(total, 1):.0f}%"
                           + (", resuming)" if 0 < done < total else ")"), err=True)
            return
        self.work[split] = done - self.base
        if self.bar is not None:
            self.bar.update(done - self.bar.n)
            return
        now = time.perf_counter()
        if done >= total or now - self.last >= self.every:
            self.last = now
            rate = (done - self.base) / max(now - self.t0, 1e-9)
            click.echo(f"{split}: {done}/{total} images ({100 * done / max(total, 1):.0f}%, "
                       f"{rate:.0f} img/s)", err=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _sigterm_to_interrupt(signum, frame):
    raise KeyboardInterrupt


@contextmanager
def interruptible(message: str, *, quiet: bool = False):
    """SIGTERM acts like Ctrl-C; both print ``message`` (unless ``quiet``) and exit 130."""
    old = signal.signal(signal.SIGTERM, _sigterm_to_interrupt)
    try:
        yield
    except KeyboardInterrupt:
        if not quiet:
            click.echo(f"\nInterrupted: {message}", err=True)
        sys.exit(130)
    finally:
        signal.signal(signal.SIGTERM, old)
