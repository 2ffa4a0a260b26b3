"""Claim: a user can copy the README's example test into their own suite and it runs there:
`distshare.testing.run_distributed` and the `distshare_run` fixture (a registered pytest
plugin) start real gloo ranks, and `assert_replicas_in_sync` fails the test, saying why and
naming the tensors, when the ranks do not share one set of weights."""

from __future__ import annotations

import re
import sys
from importlib import metadata

import pytest
from conftest import ROOT, run_command

README = ROOT / "README.md"


def readme_example() -> str:
    text = README.read_text()
    match = re.search(r"<!-- example: test_my_ddp.py -->\s*```python\n(.*?)```\s*<!-- /example -->", text, re.S)
    assert match, "README lost its copyable example test"
    return match.group(1)


def test_the_plugin_is_registered_with_pytest():
    plugins = {ep.name: ep.value for ep in metadata.entry_points(group="pytest11")}
    assert plugins.get("distshare") == "distshare.testing.pytest_plugin"


@pytest.mark.slow
def test_readme_example_passes_and_its_broken_twin_fails(tmp_path):
    example = readme_example()
    (tmp_path / "test_my_ddp.py").write_text(example)
    # The same test without DDP: every rank trains on its own batches and the weights part.
    broken = example.replace("ddp = DistributedDataParallel(model)", "ddp = model")
    broken = broken.replace("def test_the_same_with_the_fixture", "def _not_collected")
    assert broken != example
    (tmp_path / "test_broken.py").write_text(broken)
    pytest_cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--distshare-timeout", "30"]
    proc = run_command([*pytest_cmd, str(tmp_path)], cwd=tmp_path, timeout=240)
    out = proc.stdout + proc.stderr
    assert "2 passed" in out and "1 failed" in out, out[-3000:]
    assert "test_broken.py::test_ddp_keeps_one_set_of_weights" in out
    # The failure says why first (no DDP: the gradients were never reduced), then names the
    # parameters that parted, with their optimizer state summarized, and the ranks.
    assert "replicas differ: grads_not_synced: the gradients the optimizer used differ" in out, out[-3000:]
    assert re.search(r"4 parameters and their 8 optimizer-state tensors: param/0\.bias on ranks 0, 1", out), out[-3000:]
