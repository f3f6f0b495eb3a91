"""What porder's click commands share: the grammar (readable ranges, one option class with
deprecated spellings, ``--json``), error mapping, interruption, progress, and the
one-line message of the first CPU kernel compile.

The grammar's rules are in ``docs/cli-grammar.md``; this module is where they are kept.
"""
from __future__ import annotations

import _thread
import json
import math
import os
import re
import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import PurePath
from typing import NoReturn

import click

from ..measures import MEASURES
from ..messages import one_line, printable

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _number(x) -> str:
    """A bound as a person reads it: 2^63-1, not 9223372036854775807."""
    for bits in (63, 64, 32, 31):
        if x == 2**bits - 1:
            return f"2^{bits}-1"
    return f"{x:g}" if isinstance(x, float) else str(x)


class ReadableRange:
    """Mixin for click's number ranges: the range in words, in help and in errors
    ("1 or more", "1 to 256", "above 0, below 1") instead of ``0<=x<=9223372036854775807``."""

    def _describe_range(self) -> str:
        lo, hi = self.min, self.max
        if lo is not None and hi is not None and not self.min_open and not self.max_open:
            return f"{_number(lo)} to {_number(hi)}"
        if hi is None and not self.min_open and lo is not None:
            return f"{_number(lo)} or more"
        parts = []
        if lo is not None:
            parts.append(f"{'above' if self.min_open else 'at least'} {_number(lo)}")
        if hi is not None:
            parts.append(f"{'below' if self.max_open else 'at most'} {_number(hi)}")
        return ", ".join(parts)


class IntRange(ReadableRange, click.IntRange):
    """``click.IntRange`` with the range in words."""

    name = "integer"


class FiniteFloat(ReadableRange, click.FloatRange):
    """A ``click.FloatRange`` (range in words) that also refuses ``nan`` and ``inf`` (exit 2)."""

    name = "float"

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


# Seeds are stored as int64 (in HDF5 attributes and checkpoints).
SEED = IntRange(0, 2**63 - 1)


def _rank0() -> bool:
    """False in the processes of a torchrun job other than rank 0: they print only errors."""
    return os.environ.get("RANK", "0") in ("", "0")


class Option(click.Option):
    """A click option that also answers to its ``old_names``, kept for one release.

    The old spellings parse as the option itself (same type, checks and callback),
    are left out of ``--help`` and shell completion, and print one line on stderr
    when used: ``porder: --threads is deprecated, use --workers (-j)``. Errors name
    every spelling, old ones included, so a message matches what was typed.
    """

    def __init__(self, param_decls=None, *, old_names: tuple[str, ...] = (), **attrs):
        self.old_names = tuple(old_names)
        decls = list(param_decls or ())
        super().__init__(decls + [n for n in self.old_names if n not in decls], **attrs)

    @property
    def current(self) -> list[str]:
        """The spellings that are not deprecated, as --help shows them."""
        return [o for o in self.opts if o not in self.old_names]

    def get_help_record(self, ctx):
        opts, self.opts = self.opts, self.current
        try:
            return super().get_help_record(ctx)
        finally:
            self.opts = opts

    def replacement(self) -> str:
        """``--workers (-j)``: the spelling to use instead of a deprecated one."""
        longs = [o for o in self.current if o.startswith("--")]
        shorts = [o for o in self.current if not o.startswith("--")]
        return (longs or shorts)[0] + (f" ({shorts[0]})" if longs and shorts else "")


class Command(click.Command):
    """A porder command: :class:`Option`'s old names announced once each when used."""

    def parse_args(self, ctx, args):
        if not ctx.resilient_parsing and _rank0():
            old = {d: p for p in self.params if isinstance(p, Option) for d in p.old_names}
            told = set()
            for arg in args:
                if arg == "--":
                    break
                name = arg.split("=", 1)[0]
                if name in old and name not in told:
                    told.add(name)
                    click.echo(f"porder: {name} is deprecated, use {old[name].replacement()}",
                               err=True)
        return super().parse_args(ctx, args)

    def shell_complete(self, ctx, incomplete):
        old = {d for p in self.params if isinstance(p, Option) for d in p.old_names}
        return [c for c in super().shell_complete(ctx, incomplete) if c.value not in old]


def command(name: str | None = None, **attrs):
    """``click.command`` for porder: :class:`Command`, ``-h/--help``, 100 columns."""
    return click.command(name, cls=Command, context_settings=CONTEXT, **attrs)


def option(*decls, **attrs):
    """``click.option`` with :class:`Option` (``old_names=(...)`` for old spellings)."""
    return click.option(*decls, cls=Option, **attrs)


def json_option(f):
    """``--json``: the result as one JSON document on stdout (the schemas are in
    docs/cli-grammar.md); progress and messages stay on stderr."""
    return click.option("--json", "as_json", is_flag=True,
                        help="Print the result as JSON on stdout (schema: "
                             "docs/cli-grammar.md); progress stays on stderr.")(f)


def jsonable(x):
    """``x`` with paths, tuples and NumPy scalars made JSON types, NaN and infinity None."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in x]
    if isinstance(x, PurePath):
        return str(x)
    if hasattr(x, "item") and callable(x.item) and getattr(x, "ndim", 1) == 0:
        x = x.item()  # a NumPy scalar
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if x is None or isinstance(x, (str, int, float, bool)):
        return x
    return str(x)


def emit_json(obj) -> None:
    """Print ``obj`` as one JSON document on stdout (``--json``)."""
    click.echo(json.dumps(jsonable(obj), indent=2, allow_nan=False))


COMPILE_MESSAGE = "porder: compiling the CPU kernels, once per machine, about 30 s"


def compile_kernels_first(measures, *, on_cpu: bool = True) -> float | None:
    """Compile porder's CPU kernels now, saying so on one line, when a run needs them and
    numba's cache does not hold them yet (a machine's first run, or a new porder or numba).

    Called before a command starts its clock, so the compile wait is counted
    apart from any images-per-second rate. ``measures`` are the names the run
    orders by; only porder's built-in formulas use the kernels. Returns the
    seconds spent compiling, or None when nothing was compiled. A failure is left
    to the run itself, which reports it.
    """
    from ..measures import as_builtin, get_measure

    if not on_cpu:
        return None
    try:
        if not any(as_builtin(get_measure(m)) is not None for m in measures):
            return None
        from ..kernels import cpu

        if cpu.cache_state().warm:
            return None
    except Exception:  # an unknown measure, numba missing or moved: the run says why
        return None
    click.echo(COMPILE_MESSAGE + " ...", err=True, nl=False)
    t0 = time.perf_counter()
    try:
        cpu.load()
    except Exception:  # raised again, with its message, where the run needs the kernels
        click.echo(" failed", err=True)
        return None
    except BaseException:
        click.echo("", err=True)
        raise
    seconds = time.perf_counter() - t0
    click.echo(f" done in {seconds:.0f} s", err=True)
    return seconds


def parse_shard_option(ctx, param, value):
    """``--shard I/N`` -> (I, N) with 0 <= I < N, or None when the option is not given."""
    if value is None:
        return None
    match = re.fullmatch(r"(\d+)/(\d+)", value)
    if not match:
        raise click.BadParameter(f"{value!r} is not I/N with whole numbers, e.g. 0/4", ctx,
                                 param)
    i, n = int(match.group(1)), int(match.group(2))
    if n < 1 or not i < n:
        raise click.BadParameter(f"{value!r} needs 0 <= I < N", ctx, param)
    return i, n


@contextmanager
def library_errors(prefix: str = ""):
    """Turn library errors into one-line click errors (exit 1), no traceback.

    ``prefix`` starts the message (e.g. ``"rank 1: "`` for a process of a torchrun job).
    Control characters (from file or class names) are escaped, never sent to the terminal.
    """
    try:
        yield
    except click.ClickException:
        raise
    except (ValueError, OSError) as e:
        raise click.ClickException(printable(prefix + one_line(e, first=True))) from None


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


# ctypes prints and drops an exception raised in a Python callback from C.
# llvmlite's are the ones porder runs: LLVM calls them to store and fetch the
# objects of numba's compiled-kernel cache, while a run's first batch loads the
# kernels. A KeyboardInterrupt raised there is lost (the run goes on as if no
# Ctrl-C came) or leaves LLVM without the object it asked for (a crash).
_CALLBACK_CODE = os.sep + os.path.join("llvmlite", "binding") + os.sep
_REDELIVER_S = 0.02  # how soon an interrupt held back from a callback comes again


def _redeliver(signum: int) -> None:
    """Send ``signum`` again, to the main thread itself.

    A real signal, not ``_thread.interrupt_main``: that only marks the handler
    as pending, which a main thread blocked in a lock or queue wait (the next
    batch that never comes, from a stuck decode) would never run.
    """
    try:
        signal.pthread_kill(threading.main_thread().ident, signum)
    except (AttributeError, OSError, ValueError):  # no pthread_kill on this platform
        _thread.interrupt_main(signum)


def _interrupt(signum, frame):
    """Handler of SIGINT and SIGTERM: raise KeyboardInterrupt, but not in llvmlite's code.

    While the main thread runs llvmlite's ctypes layer (its callbacks, and what
    they call), the signal is delivered again ``_REDELIVER_S`` later instead.
    """
    while frame is not None:
        if _CALLBACK_CODE in frame.f_code.co_filename:
            timer = threading.Timer(_REDELIVER_S, _redeliver, (signum,))
            timer.daemon = True
            timer.start()
            return
        frame = frame.f_back
    raise KeyboardInterrupt


def interrupt_handlers() -> dict:
    """Install :func:`_interrupt` for SIGTERM, and for SIGINT unless Ctrl-C is not Python's.

    SIGINT keeps its handler when it is not ``signal.default_int_handler``
    (ignored, as in a background job, or a caller's own). Returns the old
    handlers, for :func:`restore_handlers`.
    """
    old = {signal.SIGTERM: signal.signal(signal.SIGTERM, _interrupt)}
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        old[signal.SIGINT] = signal.signal(signal.SIGINT, _interrupt)
    return old


def restore_handlers(old: dict) -> None:
    """Put back the handlers :func:`interrupt_handlers` replaced."""
    for signum, handler in old.items():
        signal.signal(signum, handler)


def exit_interrupted() -> NoReturn:
    """Exit with status 130 once a Ctrl-C or SIGTERM has been handled.

    CPython marks an interrupt as unhandled when its KeyboardInterrupt leaves
    code run by ``exec``/``eval`` of a source string, even if a caller catches
    it later; under ``python -m`` the interpreter then ends, after its cleanup,
    by sending itself SIGINT (status -2 from ``subprocess``) instead of exiting
    130. Such code runs at any time in imports: scipy execs ``from numpy
    import *`` while numba loads the cached kernels of a run's first batch.
    Every string ``exec`` first clears the mark, so an empty one forgets the
    interrupt that was handled. An interrupt that no code handles still ends
    the process through SIGINT.
    """
    exec("")  # clears CPython's unhandled-KeyboardInterrupt mark (see above)
    sys.exit(130)


@contextmanager
def interruptible(message: str, *, quiet: bool = False):
    """SIGTERM acts like Ctrl-C; both print ``message`` (unless ``quiet``) and exit 130."""
    old = interrupt_handlers()
    try:
        yield
    except KeyboardInterrupt:
        if not quiet:
            click.echo(f"\nInterrupted: {message}", err=True)
        exit_interrupted()
    finally:
        restore_handlers(old)


class MeasureChoice(click.Choice):
    """``click.Choice`` over the measure registry, plugins included, read when first used.

    The choices are listed when an option is converted or its help shown, not
    when the CLI is imported, so ``porder --help`` loads no plugin.
    """

    def __init__(self, exclude: tuple[str, ...] = ()):
        self._exclude = tuple(exclude)
        super().__init__((), case_sensitive=True)

    @property
    def choices(self) -> tuple[str, ...]:
        return tuple(m for m in MEASURES if m not in self._exclude)

    @choices.setter
    def choices(self, value) -> None:  # click.Choice.__init__ assigns; the registry decides
        pass
