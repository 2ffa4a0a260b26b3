"""A user's mistake ends in one line on stderr and exit code 2: never a traceback.

Every case names what was wrong (the config field or the flag), and `train` and `verify`
refuse before a single rank starts: a mistake found inside N ranks would arrive N times,
late. Most cases run `distshare.cli.main` in-process (fast); a few run the real
`python -m distshare` to prove the exit code end to end.
"""

from __future__ import annotations

import json
import re

import pytest
from conftest import run_cli

from distshare.cli import main


@pytest.fixture(autouse=True)
def no_ranks_start(monkeypatch, tmp_path):
    """Starting training at all is a failure here: every case must be refused before."""

    def started(*args, **kwargs):
        pytest.fail("training started: the mistake was not caught before spawning ranks")

    monkeypatch.setattr("distshare.commands.train.run_engine", started)
    monkeypatch.setattr("distshare.commands.verify.run_engine", started)
    monkeypatch.chdir(tmp_path)  # nothing may land in the repository (runs/)


@pytest.fixture
def files(tmp_path):
    """Paths for the file mistakes: malformed YAML, not text, a regular file, a missing one."""
    (tmp_path / "bad.yaml").write_text("plan:\n  global_batch: 32\n  accum_steps: 2: 3\n")
    (tmp_path / "binary.yaml").write_bytes(b"\xff\xfe\x00\x81")
    (tmp_path / "a_file").write_text("not a directory\n")
    return tmp_path


def refuse(capsys, argv: list[str]) -> str:
    """Run the CLI, require exit 2 and a single error line without traceback; return the line."""
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2, f"exit code {code}, stderr: {err}"
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line, got: {err!r}"
    # argparse's form for a command line: `distshare train: error: ...`; distshare's for the rest
    assert re.match(r"distshare( [a-z]+)?: error: ", lines[0]), lines[0]
    return lines[0]


# Each: arguments after the subcommand, and what the one line must name.
CONFIG_MISTAKES = [
    pytest.param(["--set", "plan.wold_size=2"], "'plan.wold_size': unknown key", id="unknown-key"),
    pytest.param(["--set", "wold_size=2"], "'wold_size': unknown key", id="unknown-top-level-key"),
    pytest.param(["--set", "plan.world_size=two"], "'plan.world_size': expected an integer", id="wrong-type"),
    pytest.param(["--set", "model.positional=1"], "'model.positional': expected true or false", id="int-for-bool"),
    pytest.param(["--set", "plan.global_batch=0"], "'plan.global_batch': expected a positive", id="non-positive"),
    pytest.param(
        ["--set", "plan.global_batch=33", "--nproc", "2"],
        "'plan.global_batch': 33 is not divisible",
        id="g-not-divisible",
    ),
    pytest.param(
        ["--set", "plan.global_batch=36", "--set", "plan.accum_steps=3", "--nproc", "8"],
        "'plan.global_batch': 36 is not divisible by world_size x accum_steps = 8 x 3",
        id="g-not-divisible-by-nproc",
    ),
    pytest.param(
        ["--set", "plan.global_batch=null", "--set", "plan.micro_batch=null"],
        "'plan': give two of",
        id="plan-underdetermined",
    ),
    pytest.param(
        ["--set", "plan.global_batch=4096"],
        "'plan.global_batch': 4096 is larger than the data set",
        id="g-larger-than-data",
    ),
    pytest.param(["--set", "model.name=rnn"], "'model.name': unknown value 'rnn'", id="unknown-model"),
    pytest.param(["--set", "data.name=imagenet"], "'data.name': unknown value 'imagenet'", id="unknown-dataset"),
    pytest.param(["--set", "sync=magic"], "'sync': unknown value 'magic'", id="unknown-sync"),
    pytest.param(["--set", "data.name=file"], "'data.path'", id="file-without-path"),
    pytest.param(
        ["--set", "data.name=file", "--set", "data.path=missing.csv"], "'data.path': no such file", id="file-missing"
    ),
    pytest.param(["--set", "optim.lr=.nan"], "'optim.lr'", id="nan-lr"),
    pytest.param(["--set", "optim.momentum=-1"], "'optim.momentum'", id="negative-momentum"),
    pytest.param(["--set", "timeout_s=.inf"], "'timeout_s'", id="infinite-timeout"),
    pytest.param(["--set", "noequals"], "--set expects key=value", id="override-without-value"),
    pytest.param(["--config", "missing.yaml"], "config file not found: missing.yaml", id="missing-config"),
    pytest.param(["--config", "bad.yaml"], "bad.yaml is not valid YAML (line 3, column 17)", id="malformed-yaml"),
    pytest.param(["--config", "binary.yaml"], "binary.yaml cannot be read", id="config-not-text"),
]

FLAG_MISTAKES = [
    pytest.param(["--nproc", "0"], "argument --nproc: expected a positive integer, got 0", id="nproc-0"),
    pytest.param(["--nproc", "x"], "argument --nproc: expected a positive integer, got 'x'", id="nproc-x"),
    pytest.param(["--steps", "-1"], "argument --steps: expected a positive integer, got -1", id="steps-negative"),
    pytest.param(["--timeout", "0"], "argument --timeout: expected a positive number", id="timeout-0"),
    pytest.param(["--timeout", "inf"], "argument --timeout: expected a positive number", id="timeout-inf"),
    pytest.param(["--seed", "x"], "argument --seed: invalid int value", id="seed-x"),
    pytest.param(["--sync", "magic"], "argument --sync: invalid choice", id="sync-choice"),
    pytest.param(["--frobnicate"], "unrecognized arguments: --frobnicate", id="unknown-flag"),
    pytest.param(["--out", "a_file"], "--out a_file: exists and is not a directory", id="out-is-a-file"),
    pytest.param(["--out", "a_file/run"], "--out a_file/run: cannot create the directory", id="out-under-a-file"),
]


@pytest.mark.parametrize("command", ["train", "verify"])
@pytest.mark.parametrize(("args", "names"), CONFIG_MISTAKES + FLAG_MISTAKES)
def test_user_mistakes_are_one_line_naming_the_field_and_exit_2(capsys, files, command, args, names):
    line = refuse(capsys, [command, *args, "--no-progress"])
    assert names in line


def test_config_field_errors_say_config_field(capsys):
    line = refuse(capsys, ["train", "--set", "plan.global_batch=0"])
    assert line == "distshare: error: config field 'plan.global_batch': expected a positive integer, got 0"


@pytest.mark.parametrize("argv", [["frobnicate"], []], ids=["unknown-subcommand", "no-subcommand"])
def test_subcommand_mistakes_are_one_line_and_exit_2(capsys, argv):
    line = refuse(capsys, argv)
    assert "COMMAND" in line and "see distshare --help" in line


def test_env_json_is_valid_json_with_torch_and_backends(capsys):
    assert main(["env", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["torch"] != "not installed"
    assert set(info["backends"]) >= {"gloo", "nccl", "mpi"}
    assert info["backends"]["gloo"] is True  # every CPU run of distshare stands on gloo


# --- end to end: the real process (conftest's run_cli), its real exit code --------------------


def test_process_exits_2_on_malformed_yaml(files):
    proc = run_cli("train", "--config", "bad.yaml", "--no-progress", cwd=files)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "distshare: error: config file bad.yaml is not valid YAML (line 3, column 17)"
    ]
    assert not (files / "runs").exists()


def test_process_exits_2_before_spawning_when_g_does_not_divide(tmp_path):
    proc = run_cli("verify", "--set", "plan.global_batch=50", "--nproc", "4", "--no-progress", cwd=tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "[rank" not in proc.stderr  # no rank ever started
    [line] = proc.stderr.strip().splitlines()
    assert "'plan.global_batch': 50 is not divisible by world_size x accum_steps = 4 x 2" in line
    assert not (tmp_path / "runs").exists()


def test_process_exits_2_on_a_bad_flag_value(tmp_path):
    proc = run_cli("train", "--nproc", "x", cwd=tmp_path)
    assert (proc.returncode, "Traceback" in proc.stderr) == (2, False)
    assert len(proc.stderr.strip().splitlines()) == 1 and "--nproc" in proc.stderr


def test_help_exits_0(tmp_path):
    proc = run_cli("--help", cwd=tmp_path)
    assert proc.returncode == 0
    assert "verify" in proc.stdout and "train" in proc.stdout and "env" in proc.stdout


def test_a_positional_emptied_by_double_dash_is_one_line_and_exit_2(capsys, tmp_path, monkeypatch):
    """argparse before Python 3.12 turns `compare -- A --` into B = [] (found by test_fuzz_cli):
    refused in one line naming B, not a TypeError from deep inside."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "junk.safetensors").write_bytes(b"")
    line = refuse(capsys, ["compare", "--", "junk.safetensors", "--"])
    assert "argument B: expected one argument" in line
