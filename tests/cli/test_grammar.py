"""The CLI's one grammar (docs/cli-grammar.md): the same flag means the same thing in every
command, old spellings still work for one release with one deprecation line, ranges read as
words, every command's help has examples, and shell completion prints a script."""
from __future__ import annotations

import json

import click
import pytest
from click.testing import CliRunner

from porder.cli import main
from porder.cli.common import SEED, Option


def run(*args, env=None):
    return CliRunner().invoke(main, [str(a) for a in args], env=env)


def ok(res):
    assert res.exit_code == 0, res.output
    return res


def options(command: str, *, old: bool = False) -> dict:
    """long flag -> the option, for one command (``old``: with the deprecated spellings)."""
    out = {}
    for p in main.commands[command].params:
        if isinstance(p, click.Option):
            for o in p.opts + p.secondary_opts:
                if o.startswith("--") and (old or o not in getattr(p, "old_names", ())):
                    out[o] = p
    return out


COMMANDS = sorted(main.commands)
# Short flags and the long flag they stand for, in every command that has them
# (compare takes lists: the plural of the same word).
SHORT = {"-j": {"--workers"}, "-o": {"--out"}, "-m": {"--measure", "--measures"},
         "-p": {"--patch", "--patches"}, "-a": {"--arch", "--archs"}, "-b": {"--batch-size"},
         "-n": {"--samples"}, "-f": {"--format"}, "-h": {"--help"}}


def test_each_short_flag_means_one_thing_everywhere():
    for command in COMMANDS:
        for p in main.commands[command].params:
            if not isinstance(p, click.Option):
                continue
            shorts = [o for o in p.opts if not o.startswith("--")]
            longs = [o for o in getattr(p, "current", p.opts) if o.startswith("--")]
            for s in shorts:
                assert s in SHORT, (command, s)
                assert longs[0] in SHORT[s], (command, s, longs)


def test_shared_flags_have_one_type_range_and_device_default():
    seen: dict[str, list] = {}
    for command in COMMANDS:
        for flag, p in options(command).items():
            seen.setdefault(flag, []).append((command, p))
    for flag, uses in seen.items():
        if len(uses) < 2 or flag == "--help":
            continue
        kinds = {type(p.type).__name__ for _, p in uses}
        assert len(kinds) == 1, (flag, uses)
        ranges = {(getattr(p.type, "min", None), getattr(p.type, "max", None),
                   getattr(p.type, "min_open", None), getattr(p.type, "max_open", None))
                  for _, p in uses}
        if flag not in ("--size",):  # compare needs 8 px at least for its networks
            assert len(ranges) == 1, (flag, ranges)
    devices = {p.default for c in COMMANDS for f, p in options(c).items() if f == "--device"}
    assert devices == {"auto"}
    assert {c for c in COMMANDS if "--device" in options(c)} == {"reorder", "train", "compare"}
    assert {c for c in COMMANDS if "--workers" in options(c)} == {"reorder", "export", "train",
                                                                  "compare"}
    for c in ("reorder", "compare"):
        t = options(c)["--test-fraction"].type
        assert (t.min, t.max, t.min_open, t.max_open) == (0, 1, False, True)
    assert options("reorder")["--seed"].type is options("train")["--seed"].type is SEED


@pytest.mark.parametrize("command", ["reorder", "export", "merge", "show", "train", "compare",
                                     "inspect", "measures", "info"])
def test_every_result_command_takes_json(command):
    assert "--json" in options(command)


def test_writers_refuse_an_existing_output_without_overwrite():
    for command in ("reorder", "export", "merge", "show"):
        assert "--overwrite" in options(command), command


def test_help_reads_ranges_as_words_and_shows_examples():
    for command in COMMANDS:
        text = ok(run(command, "--help")).output
        assert "Examples:" in text, command
        assert "9223372036854775807" not in text and "<=x" not in text and "x>=" not in text
    assert "0 to 2^63-1" in run("reorder", "--help").output
    assert "at least 0, below 1" in run("compare", "--help").output
    res = run("reorder", "--seed", "-1", "synthetic:4", "o.h5")
    assert res.exit_code == 2 and "not in the range 0 to 2^63-1" in res.output


def test_old_spellings_are_hidden():
    for command in COMMANDS:
        text = run(command, "--help").output
        for p in main.commands[command].params:
            for old in getattr(p, "old_names", ()):
                assert f"{old} " not in text and f"{old}," not in text, (command, old)


@pytest.mark.parametrize("command, old, new", [
    ("train", "--threads", "--workers (-j)"), ("train", "--reorder", "--measure (-m)"),
    ("compare", "--threads", "--workers (-j)"), ("compare", "--patch", "--patches (-p)"),
    ("compare", "--arch", "--archs (-a)"), ("show", "--output", "--out (-o)"),
])
def test_old_spellings_are_aliases(command, old, new):
    p = options(command, old=True)[old]
    assert isinstance(p, Option) and old in p.old_names and p.replacement() == new


def test_old_spellings_still_work_with_one_deprecation_line(tmp_path):
    data = tmp_path / "none.h5"
    ok(run("reorder", "--no-progress", "--measure", "none", "synthetic:40:2", data))
    res = ok(run("compare", "synthetic:40:2", "-o", tmp_path / "c", "--patch", "4,8",
                 "--arch", "vgg", "--threads", "1", "--threads", "1", "--dry-run", "--json"))
    plan = json.loads(res.stdout)
    assert plan["settings"]["patches"] == [4, 8] and plan["settings"]["archs"] == ["vgg"]
    for old, new in (("--patch", "--patches (-p)"), ("--arch", "--archs (-a)"),
                     ("--threads", "--workers (-j)")):
        line = f"porder: {old} is deprecated, use {new}"
        assert res.stderr.count(line) == 1, res.stderr
    res = ok(run("train", data, "--reorder=mi", "--patch", "8", "--threads", "1", "--steps", "1",
                 "--eval-every", "1", "-b", "4", "--width", "0.0625", "--device", "cpu",
                 "--no-progress", "--out", tmp_path / "run", "--json"))
    assert "porder: --reorder is deprecated, use --measure (-m)" in res.stderr
    assert "porder: --threads is deprecated, use --workers (-j)" in res.stderr
    config = json.loads((tmp_path / "run" / "config.json").read_text())["config"]
    assert config["reorder"] == "mi" and config["threads"] == 1
    assert json.loads(res.stdout)["step"] == 1
    res = ok(run("show", data, "--output", tmp_path / "g.png"))
    assert res.stderr.startswith("porder: --output is deprecated, use --out (-o)\n")
    assert (tmp_path / "g.png").stat().st_size > 0


def test_new_spellings_print_nothing_and_other_ranks_stay_quiet(tmp_path):
    res = ok(run("compare", "synthetic:40:2", "-o", tmp_path / "c", "-p", "8", "-a", "vgg",
                 "-j", "1", "--dry-run"))
    assert "deprecated" not in res.stderr
    # Under torchrun, ranks other than 0 print only their errors.
    res = ok(run("compare", "synthetic:40:2", "-o", tmp_path / "c", "--patch", "8",
                 "--dry-run", env={"RANK": "1"}))
    assert "deprecated" not in res.stderr


def test_an_option_after_double_dash_is_not_taken_for_an_old_spelling():
    res = run("show", "--", "--output")
    assert "deprecated" not in res.output


def test_show_refuses_to_overwrite_without_overwrite(tmp_path):
    data = tmp_path / "d.h5"
    ok(run("reorder", "--no-progress", "synthetic:20", data))
    png = tmp_path / "g.png"
    png.write_bytes(b"keep me")
    res = run("show", data, "-o", png)
    assert res.exit_code == 1 and "exists; use --overwrite" in res.output
    assert png.read_bytes() == b"keep me"
    ok(run("show", data, "-o", png, "--overwrite"))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("shell, marker", [("bash", "complete -o nosort -F"),
                                           ("zsh", "#compdef porder"),
                                           ("fish", "complete --no-files --command porder")])
def test_shell_completion_prints_a_script(shell, marker):
    res = CliRunner().invoke(main, [], prog_name="porder",
                             env={"_PORDER_COMPLETE": f"{shell}_source"})
    assert res.exit_code == 0 and marker in res.output, res.output


def test_completion_offers_new_spellings_only():
    def complete(words):
        env = {"_PORDER_COMPLETE": "bash_complete", "COMP_WORDS": words,
               "COMP_CWORD": str(len(words.split()) - 1)}
        res = CliRunner().invoke(main, [], prog_name="porder", env=env)
        return res.output
    assert "--workers" in complete("porder train --w")
    assert "--threads" not in complete("porder train --t")
    assert "--out" in complete("porder show --o") and "--output" not in complete("porder show --o")
