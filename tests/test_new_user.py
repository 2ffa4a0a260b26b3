"""What a new user hits first (issue 18, items 2 and 5), each as the user meets it.

Shipped configs: `--config transformer` works from any directory, and a wheel built without
the checkout carries the configs (a real non-editable install, run elsewhere). Mistakes: an
unknown flag is one line under its own command with "did you mean"; a global batch that does
not divide names the nearest one that does (for a grid: the smallest every partition
divides); `--engine torchrun` runs under a real torchrun; `--nproc` says what torchrun does
with it, and a real torchrun agrees; more ranks than cores is one warning, not a refusal.

Commands run in this process with the start of training replaced by `Started` (the config
the command would have run travels with it), except where a real process is the claim.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile

import pytest
from conftest import ROOT, rank0_json, read_result, run_cli, subprocess_env

from distshare.cli import build_parser, main
from distshare.commands import common
from distshare.config import SHIPPED_CONFIGS, PlanConfig, load_config, shipped_configs
from distshare.equivalence import check_partitions
from distshare.errors import ConfigError, UsageError


class Started(Exception):
    """Training would start now: the mistake (if any) was not caught, or there was none."""

    def __init__(self, engine: str, cfg) -> None:
        super().__init__(engine)
        self.engine = engine
        self.cfg = cfg


@pytest.fixture(autouse=True)
def nothing_trains(monkeypatch, tmp_path):
    """Every command stops where ranks would start; the cwd is a directory that is not the checkout."""

    def start(engine, cfg, *args, **kwargs):
        raise Started(engine, cfg)

    def grid(task, *args, **kwargs):
        raise Started("grid", task)

    monkeypatch.setattr("distshare.commands.train.run_engine", start)
    monkeypatch.setattr("distshare.commands.verify.run_engine", start)
    monkeypatch.setattr("distshare.commands.equivalence.run_grid", grid)
    monkeypatch.setattr("distshare.commands.verify.run_parity", lambda cfg, *a, **k: start("all", cfg))
    monkeypatch.setattr("distshare.commands.common.relaunch", lambda nproc, args: start("torchrun", nproc))
    monkeypatch.chdir(tmp_path)


def started(argv: list[str]) -> Started:
    with pytest.raises(Started) as info:
        main(argv)
    return info.value


def refused(capsys, argv: list[str]) -> str:
    """Exit 2 and one line on stderr, no traceback; the line."""
    code = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, (code, err)
    return lines[0]


# --- item 2: the shipped configs --------------------------------------------------------------


@pytest.mark.parametrize("name", ["transformer", "cnn", "cnn.yaml"])
def test_a_bare_name_is_the_shipped_config_from_any_directory(name):
    path = SHIPPED_CONFIGS / "train" / (name.removesuffix(".yaml") + ".yaml")
    shipped = load_config(path)
    assert shipped != load_config(None)  # the control: the shipped config is not the defaults
    cfg = started(["train", "--config", name, "--no-progress"]).cfg
    assert cfg == shipped


def test_a_file_of_that_name_here_wins_over_the_shipped_config(tmp_path):
    (tmp_path / "transformer").write_text("steps: 7\n")
    assert started(["train", "--config", "transformer", "--no-progress"]).cfg.steps == 7


def test_an_unknown_name_lists_the_shipped_configs_and_the_near_miss(capsys):
    line = refused(capsys, ["train", "--config", "transfomer", "--no-progress"])
    assert line == (
        "distshare: error: config file not found: transfomer (give a path, or a shipped config by name: "
        "cnn, transformer); did you mean --config transformer?"
    )


def test_a_checkout_path_used_elsewhere_names_the_shipped_copy(capsys):
    line = refused(capsys, ["verify", "--config", "configs/train/cnn.yaml", "--no-progress"])
    assert line.endswith("the same config ships with distshare: --config cnn"), line


def test_the_repository_configs_are_the_shipped_configs():
    """One copy: configs/ at the top (launch scripts, the README) holds the very files the
    wheel ships. An edit on one side only, or a file on one side only, fails here."""
    ours = {p.relative_to(ROOT / "configs"): p.read_bytes() for p in (ROOT / "configs").rglob("*.yaml")}
    shipped = {p.relative_to(SHIPPED_CONFIGS): p.read_bytes() for p in SHIPPED_CONFIGS.rglob("*.yaml")}
    assert ours == shipped
    assert set(shipped_configs()) == {"cnn", "transformer"}
    assert {p.parts[0] for p in shipped} == {"train", "accelerate"}


@pytest.mark.slow
def test_a_wheel_carries_the_configs_and_trains_outside_the_checkout(tmp_path):
    """Built from the package alone (no top-level configs/ beside it), installed non-editable,
    run from a directory that holds nothing: a shipped config by name, and no config at all."""
    src = tmp_path / "src"
    shutil.copytree(ROOT / "distshare", src / "distshare", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    build = ["wheel", "--no-deps", str(src), "-w", str(tmp_path / "wheel")]
    # Offline with this environment's setuptools where it can build (>= 68, with bdist_wheel);
    # else as `pip install` builds: setuptools fetched into an isolated environment.
    offline = subprocess.run(pip + build + ["--no-build-isolation", "--no-index"], capture_output=True, timeout=300)
    if offline.returncode != 0:
        subprocess.run(pip + build, check=True, capture_output=True, timeout=300)
    [wheel] = (tmp_path / "wheel").glob("distshare-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for path in sorted(p.relative_to(SHIPPED_CONFIGS) for p in SHIPPED_CONFIGS.rglob("*.yaml")):
        assert f"distshare/configs/{path.as_posix()}" in names
    site = tmp_path / "site"
    subprocess.run(pip + ["install", "--no-deps", "--no-index", "--target", str(site), str(wheel)], check=True,
                   capture_output=True, timeout=300)  # fmt: skip
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    script = (
        "import sys, distshare; from distshare.cli import main; "
        f"assert distshare.__file__.startswith({str(site)!r}), distshare.__file__; "
        "run = ['train', '--steps', '1', '--no-progress']; "
        "sys.exit(main(run + ['--config', 'cnn', '--out', 'a']) or main(run + ['--out', 'b']))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        cwd=elsewhere,
        env=subprocess_env(PYTHONPATH=str(site)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read_result(elsewhere / "a")["config"]["model"]["name"] == "cnn"
    assert read_result(elsewhere / "b")["config"]["steps"] == 1  # no --config: the defaults, from anywhere


# --- item 5: mistakes ---------------------------------------------------------------------------


def test_an_unknown_flag_is_one_line_under_its_command_with_a_near_miss(capsys):
    line = refused(capsys, ["train", "--stpes", "3"])
    assert line == (
        "distshare train: error: unrecognized arguments: --stpes 3; did you mean --steps? (see distshare train --help)"
    )


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["verify", "--checkpoint-dir", "x"], "distshare verify: error: unrecognized arguments: --checkpoint-dir x; "
         "--checkpoint-dir is a flag of distshare train (see distshare verify --help)"),
        (["train", "--nproc-per-node", "2"], "did you mean --nproc?"),
        (["train", "--output-dir", "x"], "did you mean --out?"),
        (["train", "--engine", "accelarate"], "invalid choice: 'accelarate' (choose from "),
        (["train", "--engine", "accelarate"], "did you mean 'accelerate'? (see distshare train --help)"),
        (["trian"], "distshare: error: argument COMMAND: invalid choice: 'trian'"),
        (["trian"], "did you mean 'train'? (see distshare --help)"),
    ],
)  # fmt: skip
def test_a_mistaken_argument_names_what_was_meant(capsys, argv, expected):
    line = refused(capsys, argv)
    assert expected in line, line
    assert not line.startswith("distshare: error: distshare")  # the prefix once


@pytest.mark.parametrize("flag", ["--frobnicate", "--bogus", "--verbose"])
def test_a_flag_nothing_resembles_gets_no_guess(capsys, flag):
    line = refused(capsys, ["train", flag])
    assert line == f"distshare train: error: unrecognized arguments: {flag} (see distshare train --help)"


@pytest.mark.parametrize(
    ("argv", "world", "k", "given"),
    [
        (["train", "--nproc", "3"], 3, 1, 32),
        (["verify", "--nproc", "4", "--set", "plan.global_batch=50"], 4, 2, 50),
        (["train", "--nproc", "2", "--set", "plan.global_batch=36", "--set", "plan.accum_steps=5"], 2, 5, 36),
    ],
)
def test_a_global_batch_that_does_not_divide_names_the_nearest_that_does(capsys, argv, world, k, given):
    line = refused(capsys, [*argv, "--no-progress"])
    assert f"{given} is not divisible by world_size x accum_steps = {world} x {k}" in line
    fix = int(re.search(r"--set plan\.global_batch=(\d+)$", line).group(1))

    def works(g: int) -> bool:
        try:
            PlanConfig(world_size=world, global_batch=g, accum_steps=k).resolve()
        except ConfigError:
            return False
        return True

    nearer = range(max(1, given - abs(fix - given) + 1), given + abs(fix - given))
    assert works(fix) and not any(works(g) for g in nearer)
    # ... and the command as told runs (reaches the start of training).
    assert started([*argv, "--set", f"plan.global_batch={fix}", "--no-progress"]).cfg.plan.global_batch == fix


@pytest.mark.parametrize(
    ("grid", "smallest"),
    [(["--world-sizes", "1,2,3,4"], 96), (["--world-sizes", "1,2,3", "--accum-steps", "1,2"], 36)],
)
def test_the_grid_names_the_global_batch_every_partition_divides(capsys, grid, smallest):
    line = refused(capsys, ["equivalence", *grid, "--no-progress"])
    assert line.endswith(f"--set plan.global_batch={smallest}"), line
    ws = [int(w) for w in grid[1].split(",")]
    ks = [int(k) for k in grid[3].split(",")] if len(grid) > 2 else [1, 2, 4, 8]

    def works(g: int) -> bool:
        try:
            check_partitions(g, ws, ks)
        except UsageError:
            return False
        return True

    # The suggestion works, and it is the nearest to G = 32 that does (today's "32" did not).
    assert works(smallest) and not works(32)
    assert not any(works(g) for g in range(max(1, 32 - abs(smallest - 32) + 1), 32 + abs(smallest - 32)))
    assert started(["equivalence", *grid, "--set", f"plan.global_batch={smallest}", "--no-progress"]).engine == "grid"


@pytest.mark.parametrize(
    ("argv", "ranks"),
    [
        (["train", "--nproc", "3", "--set", "plan.global_batch=30", "--steps", "5"], 3),
        (["verify", "--nproc", "3"], 3),
        (["verify", "--engine", "all", "--nproc", "3"], 3),  # each engine in turn
        (["train", "--engine", "torchrun", "--nproc", "3", "--set", "plan.global_batch=30", "--steps", "5"], 3),
        (["equivalence", "--world-sizes", "1,3", "--accum-steps", "1", "--set", "plan.global_batch=30"], 3),
        (["train", "--nproc", "2"], None),  # the control: as many ranks as cores, no word
        (["verify", "--nproc", "3", "--engine", "ray", "--ray-address", "10.0.0.1:6379"], None),  # not started here
    ],
)
def test_more_ranks_than_cores_is_one_warning_and_the_run_goes_on(monkeypatch, capsys, argv, ranks):
    monkeypatch.setattr(common, "available_cores", lambda: 2)
    started([*argv, "--no-progress"])
    err = capsys.readouterr().err
    if ranks is None:
        assert err == ""
    else:
        flag = "--world-sizes" if argv[0] == "equivalence" else "--nproc"
        [line] = err.splitlines()
        assert line.startswith(f"distshare: warning: {flag} {ranks}: {ranks} rank processes on 2 CPU core(s)"), line


def test_available_cores_are_this_process_s():
    assert 1 <= common.available_cores() <= (os.cpu_count() or 1)


def test_engine_torchrun_hands_torchrun_the_same_command(monkeypatch):
    """The command torchrun starts parses back to the same arguments, with torchrun's world
    in place of --nproc (which torchrun would refuse) and the torch engine in each rank."""
    calls = []
    monkeypatch.setattr(common, "relaunch", lambda nproc, args: calls.append((nproc, args)) or 0)
    argv = ["verify", "--engine", "torchrun", "--nproc", "3", "--set", "steps=2", "--set", "optim.lr=-0.001"]
    argv += ["--timeout", "9.5", "--json", "--out=-o", "--no-progress", "--seed", "5"]
    assert main(argv) == 2 and not calls  # the lr is refused here, before torchrun starts ...
    argv[argv.index("optim.lr=-0.001")] = "optim.lr=0.002"
    assert main(argv) == 0 and len(calls) == 1  # ... and a good command runs under it
    nproc, child = calls[0]
    assert nproc == 3 and child[0] == "verify" and not any(a.startswith("--nproc") for a in child)
    parser = build_parser()
    theirs, ours = vars(parser.parse_args(child)), vars(parser.parse_args(argv))
    assert theirs.pop("engine") == "torch" and ours.pop("engine") == "torchrun"
    assert theirs.pop("nproc") is None and ours.pop("nproc") == 3
    del theirs["command_parser"], ours["command_parser"]  # a new parser each time
    assert theirs == ours


def test_engine_torchrun_refuses_ray_s_restart_budget(capsys):
    line = refused(capsys, ["train", "--engine", "torchrun", "--max-failures", "1", "--no-progress"])
    assert "torchrun --max-restarts N" in line


@pytest.mark.launcher
def test_torchrun_refuses_nproc_as_the_help_says(tmp_path):
    """`--nproc` after `-m distshare` never reaches distshare: torchrun's parser reads it as an
    abbreviation of two of its own flags. The help says so instead of "ignored under torchrun"."""
    help_text = " ".join(build_parser().commands["train"].format_help().split())
    assert "torchrun refuses --nproc" in help_text and "ignored under torchrun" not in help_text
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
        + ["-m", "distshare", "train", "--nproc", "1", "--no-progress"],
        cwd=tmp_path,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "ambiguous option: --nproc" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "runs").exists()  # no rank started


@pytest.mark.slow
@pytest.mark.launcher
def test_verify_engine_torchrun_runs_under_a_real_torchrun(tmp_path):
    proc = run_cli(
        "verify", "--engine", "torchrun", "--steps", "2", "--json", "--no-progress", "--out", str(tmp_path / "v"),
        cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = rank0_json(proc)
    assert (result["engine"], result["launcher"], result["world_size"], result["steps"]) == ("torch", "torchrun", 2, 2)
    assert result["ok"] and read_result(tmp_path / "v")["launcher"] == "torchrun"
