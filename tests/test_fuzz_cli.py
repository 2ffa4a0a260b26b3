"""Claim: whatever a user types, every subcommand either accepts it or ends in exactly one
line on stderr and exit code 2: never a traceback, never exit 0 for input it refused, and
never a run directory that looks complete (a `result.json` or `report.md` of a run that did
not happen).

hypothesis builds argument lists from each subcommand's real flags (read from the parser)
with values of every kind: valid ones, negative and huge numbers, NaN and infinities,
missing paths, directories where files belong, non-UTF-8 and malformed files, junk. The CLI
runs in-process, through its argument parsing and config stages; the step that would train
(or run a demo, a grid, a parity run) is replaced by a stop sign, so an input that gets
that far counts as accepted and nothing trains. Each test counts the inputs it saw refused,
by command, and requires that most were: a generator that mostly made valid command lines
would test the happy path under another name.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from distshare.cli import COMMANDS, build_parser, main
from distshare.errors import RankError, UsageError
from distshare.integrity.checkpoint import save_checkpoint

SETTINGS = settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


class WouldRun(Exception):
    """Raised where the command would start training: the input was accepted."""


def _would_run(*args, **kwargs):
    raise WouldRun


# Where each command would start its real work (processes, demos, the grid, parity runs).
STOPS = [
    "distshare.commands.train.run_engine",
    "distshare.commands.verify.run_engine",
    "distshare.commands.common.relaunch",  # --engine torchrun: a real torchrun
    "distshare.commands.verify.run_parity",
    "distshare.commands.equivalence.run_grid",
    "distshare.commands.demo.run_demo",
]


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    """A working directory holding every kind of bad path, with the real work stubbed out."""
    root = tmp_path_factory.mktemp("fuzz-cli")
    (root / "ok.yaml").write_text("steps: 2\nplan:\n  global_batch: 8\n")
    (root / "bad.yaml").write_text("plan:\n  global_batch: 32\n  accum_steps: 2: 3\n")
    (root / "list.yaml").write_text("- 1\n- 2\n")
    (root / "binary.yaml").write_bytes(b"\xff\xfe\x00\x81steps: 2")
    (root / "empty.yaml").write_text("")
    (root / "a_dir").mkdir()
    (root / "a_file").write_text("not a directory\n")
    (root / "junk.safetensors").write_bytes(b"\x00" * 7 + b"\xff" * 30)
    (root / "big_header.safetensors").write_bytes((2**62).to_bytes(8, "little") + b"{}")
    ckpt = root / "ckpt"
    save_checkpoint(ckpt, torch.nn.Linear(3, 2), step=1)
    bad_manifest = root / "bad_manifest"
    bad_manifest.mkdir()
    (bad_manifest / "manifest.json").write_bytes(b"\xff{not json")
    odd_manifest = root / "odd_manifest"
    odd_manifest.mkdir()
    manifest = json.loads((ckpt / "manifest.json").read_text())
    (odd_manifest / "manifest.json").write_text(json.dumps({**manifest, "tensors": [1, 2]}))
    with pytest.MonkeyPatch.context() as mp:
        for target in STOPS:
            mp.setattr(target, _would_run)
        mp.chdir(root)
        mp.setenv("HF_HUB_OFFLINE", "1")
        for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "DISTSHARE_FAULT_HANG"):
            mp.delenv(var, raising=False)
        yield root


PATHS = [
    "ok.yaml",
    "bad.yaml",
    "list.yaml",
    "binary.yaml",
    "empty.yaml",
    "a_dir",
    "a_file",
    "a_file/below",
    "missing.yaml",
    "missing/deeper",
    "",
    "junk.safetensors",
    "big_header.safetensors",
    "ckpt",
    "bad_manifest",
    "odd_manifest",
    "/proc/self/mem",
    "/dev/null",
    "\x00nul",
    "café/ünïcode",
    "-",
]
NUMBERS = ["0", "1", "2", "3", "-1", "-0", "+4", "1e3", "2.5", "nan", "NaN", "inf", "-inf", "1e999", "9" * 40, "0x10"]
WORDS = ["", " ", "x", "ddp", "allreduce", "exact", "torch", "local", "ray", "accelerate", "all", "float64", "bf16"]
SETS = [
    "steps=2",
    "plan.global_batch=8",
    "plan.world_size=2",
    "model.name=cnn",
    "data.name=shapes",
    "data.name=file",
    "data.path=a_dir",
    "data.path=binary.yaml",
    "seed=-1",
    "data.seed=1e999",
    "data.num_samples=99999999999",
    "model.d_model=1000000",
    "timeout_s=1e12",
    "optim.lr=.nan",
    "plan.global_batch=null",
    "plan=3",
    "model..name=x",
    "=",
    "key",
    "checkpoint.dir=a_file",
    "checkpoint.resume=auto",
]
token = st.one_of(
    st.sampled_from(PATHS), st.sampled_from(NUMBERS), st.sampled_from(WORDS), st.text(max_size=8), st.just("--")
)


def _flags(command: str) -> list[argparse.Action]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return [a for a in sub.choices[command]._actions if a.option_strings and "-h" not in a.option_strings]


def _value_for(action: argparse.Action) -> st.SearchStrategy[str]:
    if action.choices:
        return st.one_of(st.sampled_from([str(c) for c in action.choices]), token)
    if action.dest == "overrides":
        return st.one_of(st.sampled_from(SETS), token)
    if action.dest in ("config", "out", "save_params", "checkpoint_dir", "resume", "ray_address"):
        return st.one_of(st.sampled_from(PATHS), token)
    return st.one_of(st.sampled_from(NUMBERS), token)


@st.composite
def argv_for(draw, command: str) -> list[str]:
    """A command line: the subcommand, flags (real or misspelled) with values, positionals."""
    flags = _flags(command)
    argv = [command]
    for _ in range(draw(st.integers(0, 5))):
        kind = draw(st.integers(0, 9))
        if kind == 0:
            argv.append(draw(token))  # a stray positional or junk
            continue
        if kind == 1:
            argv.append("--" + draw(st.text("abcdefgh-", min_size=1, max_size=8)))  # a flag that does not exist
            continue
        action = draw(st.sampled_from(flags))
        flag = draw(st.sampled_from(action.option_strings))
        if action.nargs == 0:
            argv.append(flag)
        elif draw(st.booleans()):
            argv += [flag, draw(_value_for(action))]
        else:
            argv.append(f"{flag}={draw(_value_for(action))}")
    if command in ("checksum", "compare", "demo"):
        argv += draw(st.lists(st.one_of(st.sampled_from(PATHS), token), max_size=3))
    if command in ("train", "verify", "equivalence") and draw(st.booleans()):
        argv += ["--steps", "2"]  # keep accepted runs small (and short-circuited anyway)
    return argv


def _complete_run_dirs(root: Path) -> list[Path]:
    return [p.parent for name in ("result.json", "report.md") for p in root.rglob(name)]


def _asks_help(arg: str) -> bool:
    return arg == "-h" or (len(arg) >= 3 and "--help".startswith(arg))  # argparse takes --h, --he, ...


def _name(argv: list[str]) -> str:
    return argv[0] if argv and argv[0] in COMMANDS else "(no command)"


def check(root: Path, capsys, argv: list[str]) -> str | None:
    """The property: accepted (reached the stop sign or finished), or refused in one line,
    exit 2. Returns "accepted", "refused", or None for a request for help."""
    capsys.readouterr()
    before = set(_complete_run_dirs(root))
    try:
        code = main(argv)
    except WouldRun:
        return "accepted"
    except SystemExit as exc:  # argparse's own exit: only --help / --version may get here
        assert exc.code == 0 and any(_asks_help(a) for a in argv), f"SystemExit({exc.code}) for {argv!r}"
        capsys.readouterr()
        return None
    out, err = capsys.readouterr()
    assert "Traceback" not in err, f"{argv!r}:\n{err}"
    new_complete = set(_complete_run_dirs(root)) - before
    if code == 2:
        lines = err.strip().splitlines()
        assert len(lines) == 1, f"{argv!r}: expected one line, got {err!r}"
        assert re.match(r"distshare( [a-z]+)?: error: ", lines[0]), f"{argv!r}: {lines[0]!r}"
        assert not new_complete, f"{argv!r}: a refused run left {new_complete}"
        return "refused"
    # Only commands that finish without training may exit otherwise: env, and checksum and
    # compare, whose exit 1 means "read, and found damaged or different" (a verdict, not
    # a refusal). Nothing that trains can end here: its work is stubbed out.
    assert _name(argv) in ("env", "checksum", "compare"), f"{argv!r} exited {code}: {err!r}"
    assert code in (0, 1), f"{argv!r} exited {code}: {err!r}"
    return "accepted"


class Tally:
    """One test's own figures: inputs refused and accepted, by command."""

    def __init__(self) -> None:
        self.refused: Counter[str] = Counter()
        self.accepted: Counter[str] = Counter()

    def check(self, root: Path, capsys, argv: list[str]) -> None:
        outcome = check(root, capsys, argv)
        if outcome is not None:
            getattr(self, outcome)[_name(argv)] += 1

    def assert_mostly_refused(self, what: str) -> None:
        """Each generator must mostly make bad input, or it tests the happy path under another name."""
        tried = self.refused + self.accepted
        print(f"\nCLI fuzzing, {what}: refused {dict(self.refused)}, accepted {dict(self.accepted)}")
        assert tried.total() >= 20, f"{what}: only {tried.total()} command lines tried"
        for name, n in tried.items():
            assert n < 20 or self.refused[name] >= n // 4, f"{what}, {name}: {self.refused[name]} of {n} refused"


@pytest.mark.fuzz
@pytest.mark.parametrize("command", COMMANDS)
def test_any_command_line_is_accepted_or_refused_in_one_line(sandbox, capsys, command):
    tally = Tally()

    @SETTINGS
    @given(argv=argv_for(command))
    def fuzz(argv):
        tally.check(sandbox, capsys, argv)

    fuzz()
    tally.assert_mostly_refused(command)


# A valid command line of each kind, to be broken in one or two places: that reaches the
# later stages (data, plan, engine, run directory, output paths) that junk never gets to.
VALID = {
    "verify": ["verify", "--steps", "2", "--no-progress", "--set", "plan.global_batch=8"],
    "train": ["train", "--steps", "2", "--no-progress", "--nproc", "2", "--set", "plan.global_batch=8"],
    "equivalence": ["equivalence", "--steps", "2", "--world-sizes", "1,2", "--accum-steps", "1,2", "--no-progress"],
    "demo": ["demo", "context", "--no-progress"],
    "checksum": ["checksum", "ckpt"],
    "compare": ["compare", "ckpt", "ckpt"],
    "env": ["env"],
}


@st.composite
def near_valid(draw) -> list[str]:
    command = draw(st.sampled_from(list(VALID)))
    argv = list(VALID[command])
    flags = _flags(command)
    for _ in range(draw(st.integers(1, 2))):
        action = draw(st.sampled_from(flags))
        flag = draw(st.sampled_from(action.option_strings))
        argv += [flag] if action.nargs == 0 else [flag, draw(_value_for(action))]
    if command in ("checksum", "compare") and draw(st.booleans()):
        argv[1] = draw(st.sampled_from(PATHS))
    return argv


@pytest.mark.fuzz
def test_a_valid_command_line_broken_in_one_place_is_refused_in_one_line(sandbox, capsys):
    tally = Tally()

    @settings(SETTINGS, max_examples=400)
    @given(argv=near_valid())
    def fuzz(argv):
        tally.check(sandbox, capsys, argv)

    fuzz()
    tally.assert_mostly_refused("valid command lines broken in one place")


@pytest.mark.fuzz
def test_any_words_at_all_are_accepted_or_refused_in_one_line(sandbox, capsys):
    tally = Tally()

    @SETTINGS
    @given(argv=st.lists(st.one_of(token, st.sampled_from(COMMANDS)), max_size=4))
    def fuzz(argv):
        if argv and argv[0] in COMMANDS or any(_asks_help(a) for a in argv):
            argv = ["--frobnicate", *argv]  # covered above; here the top-level parser meets junk
        tally.check(sandbox, capsys, argv)

    fuzz()
    tally.assert_mostly_refused("any words")


def test_an_unreadable_config_is_refused_in_one_line(sandbox, capsys):
    path = sandbox / "secret.yaml"
    path.write_text("steps: 2\n")
    path.chmod(0)
    try:
        if os.access(path, os.R_OK):
            pytest.skip("running as a user who can read any file (root): unreadable files do not exist here")
        check(sandbox, capsys, ["train", "--config", str(path)])
    finally:
        path.chmod(0o600)


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "--save-params", "a_dir"],
        ["train", "--save-params", "a_file/below.safetensors"],
        ["train", "--save-params", ""],
        ["train", "--save-params", "\x00nul"],
        ["train", "--out", "\x00nul"],
        ["verify", "--out", "a_file/below"],
        ["train", "--config", "a_dir"],
        ["train", "--config", "/dev/null"],
        ["train", "--config", "\x00nul"],
        ["train", "--set", "data.name=file", "--set", "data.path=\x00nul"],
        ["demo", "context", "--out", "a_file"],
    ],
)
def test_a_path_that_cannot_work_is_refused_before_any_work(sandbox, capsys, argv):
    # The stop sign must not be reached: a file the run writes at its end (--save-params)
    # is checked at its start, or the run would train for nothing and then fail.
    code = main([*argv, "--no-progress"] if argv[0] != "demo" else argv)
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


@pytest.mark.faults
@pytest.mark.parametrize(
    "error",
    [UsageError("found late, inside the run"), RankError(1, "found late, inside the run", "Traceback ...", 2)],
    ids=["usage-error", "usage-error-in-a-rank"],
)
def test_a_failed_run_leaves_no_directory_that_looks_complete(sandbox, capsys, monkeypatch, error):
    """A run that fails after its directory was made: marked INCOMPLETE, no result files;
    and a mistake found late (even inside a rank) is still one line, exit 2."""

    def fails(*args, **kwargs):
        raise error

    monkeypatch.setattr("distshare.commands.train.run_engine", fails)
    (sandbox / "rerun").mkdir(exist_ok=True)
    (sandbox / "rerun" / "result.json").write_text("{}")  # a complete earlier run in the same place
    (sandbox / "rerun" / "report.md").write_text("# earlier")
    code = main(["train", "--steps", "2", "--no-progress", "--out", "rerun"])
    assert code == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("distshare: error: ") and line.endswith("found late, inside the run")
    assert sorted(p.name for p in (sandbox / "rerun").iterdir()) == ["INCOMPLETE"]
