"""The house rules, as tests: the layering that keeps the package readable, and the seams it
promises (the loop's components, test plugins, one place that reads launcher environments).

Each rule was broken on the code before the house issue: `distributed/watchdog.py` imported
the fault injection, `train.py` imported resume and the replica check by name, and three
modules read TORCHELASTIC_RESTART_COUNT.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from distshare.config import load_config
from distshare.distributed.world import World
from distshare.training import Component, train

PACKAGE = Path(__file__).resolve().parents[1] / "distshare"


def _modules() -> dict[str, Path]:
    out = {}
    for f in sorted(PACKAGE.rglob("*.py")):
        parts = list(f.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """Every distshare module `path` imports, at module level or inside a function."""
    found = set()
    is_package = path.name == "__init__.py"
    here = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = here.split(".") if is_package else here.split(".")[:-1]
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join(parts + ([node.module] if node.module else []))
            names = [f"{base}.{a.name}" for a in node.names] + [base]
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != "distshare" and name != here and not here.startswith(name + "."):
                found.add(name)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: _imports(f, modules) for m, f in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, or None (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return path[path.index(n) :] + [n]
            if n not in state and (found := visit(n)):
                return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_the_package_has_no_import_cycle():
    assert _cycle(_graph()) is None


def test_the_cycle_finder_finds_a_cycle():
    # The control: the check above would say nothing if the finder could not see one.
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


# `distshare selftest` exists to run the fault injection against every verdict: the one
# command allowed to reach into the test tooling (only when it runs, never on import).
SELFTEST = {"distshare.commands.selftest": ["distshare.testing.selftest"]}


def test_no_production_module_imports_the_test_tooling():
    offenders = {
        m: sorted(i for i in imports if i.startswith("distshare.testing"))
        for m, imports in _graph().items()
        if not m.startswith("distshare.testing")
    }
    assert {m: i for m, i in offenders.items() if i} == SELFTEST


def test_the_command_line_starts_without_importing_datasets():
    # `datasets` (with pandas and pyarrow) costs 1.5 s: the CLI's --help and its refusals never
    # build a data set, so distshare.data imports it inside its builders. A module-level
    # `import datasets` anywhere under the commands' imports fails this (tried: in shapes.py).
    code = "import sys, distshare.cli as c; c.build_parser(); print(sorted({'datasets', 'pandas'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_the_loop_imports_none_of_its_components():
    loop = _graph()["distshare.training.loop"]
    components = {
        "distshare.training.checkpointer",
        "distshare.training.replica_check",
        "distshare.training.metrics",
        "distshare.training.progress",
        "distshare.integrity.replicas",
        "distshare.integrity.resume",
        "distshare.distributed.watchdog",
    }
    assert loop & components == set()


LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RESTART_COUNT")


def _environment_reads(tree: ast.AST) -> set[str]:
    """Names read from os.environ in a module: os.environ[X], os.environ.get(X), X in os.environ, os.getenv(X)."""

    def is_environ(node: ast.AST) -> bool:
        return isinstance(node, ast.Attribute) and node.attr == "environ"

    names = set()
    for node in ast.walk(tree):
        key = None
        if isinstance(node, ast.Subscript) and is_environ(node.value):
            key = node.slice
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.args:
            if (is_environ(node.func.value) and node.func.attr == "get") or node.func.attr == "getenv":
                key = node.args[0]
        elif isinstance(node, ast.Compare) and any(is_environ(c) for c in node.comparators):
            key = node.left
        if isinstance(key, ast.Constant) and isinstance(key.value, str):
            names.add(key.value)
    return names


def _launcher_reads(source: str) -> set[str]:
    reads = _environment_reads(ast.parse(source))
    return {n for n in reads if n in LAUNCHER_VARIABLES or n.startswith(("ACCELERATE_", "RAY_"))}


def test_only_launchers_reads_launcher_environments():
    readers = {
        str(f.relative_to(PACKAGE)): sorted(_launcher_reads(f.read_text()))
        for f in PACKAGE.rglob("*.py")
        if f.name != "launchers.py"
    }
    assert {f: r for f, r in readers.items() if r} == {}
    assert _launcher_reads((PACKAGE / "distributed" / "launchers.py").read_text())  # it does read them


def test_the_environment_check_sees_every_form_of_read():
    # The control: a module reading the restart count any of these ways is caught.
    for line in (
        'os.environ["RANK"]',
        'os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")',
        '"ACCELERATE_MIXED_PRECISION" in os.environ',
        'os.getenv("RAY_ADDRESS")',
    ):
        assert _launcher_reads(line), line
    assert not _launcher_reads('env = dict(os.environ); env.pop("RANK", None)')  # a child's copy is no read


class _Recorder(Component):
    """Writes down every hook the loop calls, in order."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def begin(self, loop):
        self.calls.append("begin")

    def before_step(self, loop, step):
        self.calls.append(f"before {step}")

    def wants_local_grads(self, step):
        return step == 1

    def on_local_grads(self, loop, step):
        # The rank's own gradient exists (before the optimizer step consumed it).
        assert all(p.grad is not None for p in loop.run.model.parameters())
        self.calls.append(f"local grads {step}")

    def after_step(self, loop, step, row):
        row["recorded"] = True
        self.calls.append(f"after {step}")

    def step_end(self, loop, step):
        self.calls.append(f"end {step}")

    def on_losses(self, loop, rows):
        assert all(r["recorded"] for r in rows)  # a component's field reaches the metrics row
        self.calls.append(f"losses {[r['step'] for r in rows]}")

    def end(self, loop):
        self.calls.append("end")

    def close(self, loop):
        self.calls.append("close")


def test_the_loop_hands_every_step_to_its_components_in_order():
    cfg = load_config(None, ["steps=3", "data.num_samples=64", "plan.global_batch=8", "check_every=0"])
    recorder = _Recorder()
    train(cfg, World(), progress=False, components=[recorder])
    assert recorder.calls == [
        "begin",
        "before 0",
        "after 0",
        "end 0",
        "before 1",
        "local grads 1",
        "after 1",
        "end 1",
        "before 2",
        "after 2",
        "end 2",
        "losses [0, 1, 2]",
        "end",
        "close",
    ]


def test_a_plugin_that_cannot_be_loaded_is_one_line_and_exit_2(tmp_path):
    env = {"DISTSHARE_PLUGINS": "distshare.no_such_plugin", "HF_HUB_OFFLINE": "1", "PATH": ""}
    proc = subprocess.run(
        [sys.executable, "-m", "distshare", "train", "--steps", "1", "--no-progress", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == ["distshare: error: DISTSHARE_PLUGINS: cannot import distshare.no_such_plugin: "
                     "No module named 'distshare.no_such_plugin'"]


@pytest.mark.parametrize("bad", ["nonsense", "distshare.config"])
def test_plugin_components_come_only_from_named_modules(bad, monkeypatch):
    from distshare.engines.runner import plugin_components
    from distshare.errors import UsageError

    monkeypatch.delenv("DISTSHARE_PLUGINS", raising=False)
    assert plugin_components(load_config(None, []), World(), 0) == []
    monkeypatch.setenv("DISTSHARE_PLUGINS", bad)
    with pytest.raises(UsageError, match="DISTSHARE_PLUGINS"):
        plugin_components(load_config(None, []), World(), 0)
