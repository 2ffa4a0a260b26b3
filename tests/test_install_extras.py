"""Claim: the core install runs the core, and an extra that is missing is named in one line.

`pip install distshare` carries what `distshare verify` and `distshare train` need; Ray,
accelerate, scikit-learn and Lightning are extras (`pip install 'distshare[ray]'`, ...). Here
the extras are made unimportable in every process of a command, its spawned ranks included
(a `sitecustomize` on PYTHONPATH wraps the finders of `sys.meta_path` so that none finds them:
`import` then says "No module named ...", and `importlib.util.find_spec` None, as for a
package that is not installed). Then every distshare
module still imports, `distshare verify` passes on 2 spawned CPU ranks, and `--engine ray` or
`--engine accelerate` ends with exit 2 and one line that says which `pip install` fixes it.
"""

from __future__ import annotations

import json
import os

import pytest
from conftest import ROOT, get_launch_command, run_command

from distshare.extras import EXTRAS

# The extras' top-level modules, and what they would bring with them.
BLOCKED = ("ray", "accelerate", "sklearn", "lightning", "pytorch_lightning", "transformers")
# Modules that need a package the core does not carry, and how importing them without it ends:
# refused in one line (an integration), or left unimported by the code that uses them.
NEEDS_MORE = {
    "distshare.integrations.lightning_callback": "pip install distshare[lightning]",
    "distshare.integrations.hf_trainer": "pip install transformers",
    "distshare.integrity.dsh128_triton": "No module named 'triton'",  # GPU builds of torch bring triton
}
ENGINES = ("ray", "accelerate")

# Imported by every Python process that has its folder on PYTHONPATH: the extras' packages
# are then not found, as when they are not installed.
SITECUSTOMIZE = """
import sys


class NotInstalled:
    \"""A finder of `sys.meta_path` that does not find the extras' packages (None: not here).\"""

    def __init__(self, finder):
        self.finder = finder

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            return None
        find = getattr(self.finder, "find_spec", None)
        return find(name, path, target) if find is not None else None

    def __getattr__(self, attr):
        return getattr(self.finder, attr)


sys.meta_path[:] = [NotInstalled(finder) for finder in sys.meta_path]
"""

# In one process: every distshare module imported, then `distshare train --engine E` for each
# engine that is an extra (the CLI's own `main`, its exit code and what it printed).
IMPORT_ALL_THEN_ENGINES = f"""
import contextlib, importlib, io, json, pkgutil, sys
import distshare
from distshare.cli import main
for name in {BLOCKED!r}:
    with contextlib.suppress(ImportError):
        __import__(name)
        sys.exit(f"the block failed: {{name}} imported")
needs_more = {NEEDS_MORE!r}
bad = []
for info in pkgutil.walk_packages(distshare.__path__, "distshare."):
    if info.name.endswith("__main__"):
        continue  # runs the CLI
    try:
        importlib.import_module(info.name)
    except Exception as exc:
        if needs_more.get(info.name, "-") not in str(exc):
            bad.append(f"{{info.name}}: {{type(exc).__name__}}: {{exc}}")
engines = {{}}
for engine in {ENGINES!r}:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["train", "--engine", engine, "--steps", "1", "--no-progress", "--out", sys.argv[1]])
    engines[engine] = [code, err.getvalue()]
print(json.dumps({{"bad": bad, "engines": engines}}))
"""


@pytest.fixture(scope="module")
def without_extras(tmp_path_factory) -> dict[str, str]:
    """The environment of a process (and its children) in which the extras are not installed."""
    site = tmp_path_factory.mktemp("no-extras")
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE.format(blocked=BLOCKED))
    path = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
    return {"PYTHONPATH": path}


@pytest.fixture(scope="module")
def core_only(without_extras, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("engine-refused")
    cmd = [*get_launch_command()[:1], "-c", IMPORT_ALL_THEN_ENGINES, str(out)]
    proc = run_command(cmd, timeout=180, **without_extras)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_every_core_module_imports_without_the_extras(core_only):
    assert core_only["bad"] == []


@pytest.mark.slow
@pytest.mark.parametrize("engine", ENGINES)
def test_an_engine_without_its_extra_names_the_pip_install(core_only, engine):
    code, err = core_only["engines"][engine]
    assert code == 2, err[-3000:]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert lines[0] == f"distshare: error: --engine {engine} needs {EXTRAS[engine][1]}, an optional extra: " + (
        f"pip install 'distshare[{engine}]'"
    )


@pytest.mark.slow
def test_verify_passes_on_the_core_install(without_extras, tmp_path):
    args = ["verify", "--nproc", "2", "--steps", "2", "--no-progress", "--out", str(tmp_path)]
    proc = run_command([*get_launch_command(), *args], timeout=300, **without_extras)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert (tmp_path / "result.json").is_file()


def test_the_core_leaves_the_extras_out_and_the_test_extra_brings_them_all():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = " ".join(project["dependencies"])
    extras = project["optional-dependencies"]
    for extra in EXTRAS:
        assert extra in extras, f"distshare.extras names [{extra}], pyproject has no such extra"
        for requirement in extras[extra]:
            name = requirement.split("[")[0].split(">")[0].split("=")[0].strip()
            assert name not in core, f"{name} is an extra ([{extra}]) but also a core dependency"
    # The README's test command installs ".[test]": CI must get every engine from it.
    assert any(r.startswith("distshare[") and all(e in r for e in EXTRAS) for r in extras["test"]), extras["test"]


def test_an_extra_that_is_not_installed_is_refused_in_one_line(monkeypatch):
    import importlib.util

    from distshare.errors import UsageError
    from distshare.extras import require

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    for extra in EXTRAS:
        with pytest.raises(UsageError, match=rf"^--engine x needs .+: pip install 'distshare\[{extra}\]'$"):
            require(extra, "--engine x")


def test_the_readme_quickstart_still_installs_what_it_runs():
    readme = (ROOT / "README.md").read_text()
    assert "pip install torch==2.13.0 -e . && .venv/bin/distshare verify" in readme  # the core is enough
    assert 'pip install torch==2.13.0 -e ".[test]" && .venv/bin/python -m pytest -q' in readme
