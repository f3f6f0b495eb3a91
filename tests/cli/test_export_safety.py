"""`porder export` through the CLI when things go wrong (issue 20): a foreign or
tampered OUT with --overwrite, Ctrl-C and SIGTERM, odd names, a FILE that is not a
porder file. Every failure is one ``Error:`` line (or one ``Interrupted:`` line),
exit 1 (130 for an interrupt), and nothing is removed or left that the user did not
ask for. The library side is in tests/test_export.py."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from click.testing import CliRunner

from porder.cli import main
from porder.export import MANIFEST, export

from ..conftest import REPO
from ..test_export import make_cache, snapshot


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def one_error_line(res, code, *fragments):
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert res.exit_code == code, res.output
    assert lines and len(lines) == 1 and lines[0].startswith("Error: "), res.output
    assert "Usage:" not in res.output and "Traceback" not in res.output
    for frag in fragments:
        assert frag in lines[0], res.output


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return make_cache(tmp_path_factory.mktemp("cli-export") / "c.h5", n_train=24, n_test=8)[0]


def test_the_issue_case_through_the_cli(cache, tmp_path):
    """mkdir d; echo '{}' > d/porder-export.json; echo x > d/thesis.tex;
    porder export --overwrite ref.h5 d: refused, and thesis.tex is kept."""
    d = tmp_path / "d"
    d.mkdir()
    (d / MANIFEST).write_text("{}\n")
    (d / "thesis.tex").write_text("x\n")
    before = snapshot(tmp_path)
    one_error_line(run("export", "--overwrite", "--no-progress", cache, d), 1,
                   "not a porder export", "'thesis.tex'")
    assert snapshot(tmp_path) == before


def test_a_users_file_in_an_earlier_export_through_the_cli(cache, tmp_path):
    out = export(cache, tmp_path / "exp", format="npz")
    (out / "notes.txt").write_text("mine")
    before = snapshot(tmp_path)
    one_error_line(run("export", "--overwrite", "--no-progress", cache, out), 1,
                   "1 entry that the earlier export did not write ('notes.txt')")
    assert snapshot(tmp_path) == before


def test_the_wrote_line_escapes_control_characters(cache, tmp_path):
    out = tmp_path / "a\nb"
    res = run("export", "-f", "npz", "--no-progress", cache, out)
    assert res.exit_code == 0, res.output
    wrote = [ln for ln in res.output.splitlines() if "Wrote" in ln]
    assert wrote == [f"Wrote {tmp_path}/a\\nb/ (npz, stored images): train 24, test 8 images"]
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "test.npz", "train.npz"]


@pytest.mark.parametrize("kind", ["folder", "missing", "fifo", "not-hdf5"])
def test_a_file_that_is_not_a_porder_file_is_one_line(tmp_path, kind):
    """Not click's usage block: one Error: line naming FILE (exit 1); nothing written."""
    bad = tmp_path / "in.h5"
    if kind == "folder":
        bad.mkdir()
    elif kind == "fifo":
        os.mkfifo(bad)
    elif kind == "not-hdf5":
        bad.write_text("hello")
    one_error_line(run("export", "--no-progress", bad, tmp_path / "out"), 1, str(bad))
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == (["in.h5"] if kind != "missing" else [])


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a file without read permission")
def test_an_unreadable_file_is_one_line(cache, tmp_path):
    bad = tmp_path / "c.h5"
    bad.write_bytes(open(cache, "rb").read())
    bad.chmod(0)
    one_error_line(run("export", "--no-progress", bad, tmp_path / "out"), 1, str(bad))


SIGNAL_AFTER_FIRST_CHUNK = textwrap.dedent("""
    import os, signal, sys, time
    import porder.export as ex
    ex.CHUNK_ROWS = 4
    rows = ex._rows
    def hooked(*a, **k):
        for i, item in enumerate(rows(*a, **k)):
            yield item
            if i == 0:
                os.kill(os.getpid(), getattr(signal, sys.argv[1]))
                time.sleep(10)  # the signal ends this
    ex._rows = hooked
    from porder.cli import main
    main(args=sys.argv[2:], prog_name="porder")
""")


@pytest.mark.parametrize("sig, earlier", [("SIGINT", False), ("SIGTERM", True)])
def test_an_interrupted_export_leaves_out_as_it_was(cache, tmp_path, sig, earlier):
    """Ctrl-C prints the Interrupted line of the other commands (not click's
    "Aborted!"); SIGTERM does the same (exit 130, not -15); no hidden
    .OUT.PID-xxxx.part is left, and an earlier export is untouched."""
    out = tmp_path / "exp"
    if earlier:
        export(cache, out, format="npz")
    before = snapshot(tmp_path)
    proc = subprocess.run([sys.executable, "-c", SIGNAL_AFTER_FIRST_CHUNK, sig, "export",
                           "--no-progress", *(["--overwrite"] if earlier else []), str(cache),
                           str(out)], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 130, proc.stderr
    assert "Aborted" not in proc.stderr and "Traceback" not in proc.stderr
    assert [ln for ln in proc.stderr.splitlines() if ln.startswith("Interrupted")] == [
        f"Interrupted: no partial export is left; '{out}' is as it was (or complete, if the "
        f"export had just finished)"], proc.stderr
    assert snapshot(tmp_path) == before
