"""Claim: every verdict distshare gives has a mutant that flips it, and every mutant is caught
(`distshare selftest`, run whole, as CI runs it). The clean runs pass, so a verdict that
fails everything cannot hide in the table either."""

from __future__ import annotations

import pytest
from conftest import rank0_json, read_result, run_cli

from distshare.demos import DEMOS
from distshare.equivalence.pitfalls import PITFALLS
from distshare.testing.divergences import REPRODUCTIONS
from distshare.testing.selftest import VERIFY_MUTANTS


@pytest.fixture(scope="module")
def selftest(tmp_path_factory):
    out = tmp_path_factory.mktemp("selftest")
    proc = run_cli("selftest", "--json", "--no-progress", "--out", str(out), timeout=1800)
    return proc, out


@pytest.mark.slow
@pytest.mark.timeout(1200)  # the catalogue runs in this test's setup: about 4 minutes on 2 idle cores
def test_every_mutant_is_caught_and_every_clean_run_passes(selftest):
    proc, out = selftest
    result = rank0_json(proc)
    missed = [f"{r['verdict']} x {r['mutant']}: {r['detail']}" for r in result["rows"] if not r["caught"]]
    assert missed == [] and proc.returncode == 0
    assert result["ok"] and result["caught"] == result["mutants"] and result["mutation_score"] == 1.0
    assert read_result(out) == result  # written, and readable again
    assert "Mutation score" in (out / "report.md").read_text()


@pytest.mark.slow
@pytest.mark.timeout(1200)  # when run alone, the catalogue runs in this test's setup
def test_every_verdict_has_a_mutant(selftest):
    result = rank0_json(selftest[0])
    mutated = {r["verdict"] for r in result["rows"] if not r["clean"]}
    for check in set(VERIFY_MUTANTS.values()) | {"replicas identical"}:
        assert f"verify: {check}" in mutated
    assert "verify --sync exact: equals one big batch" in mutated
    assert {"grid (W=1, k=2 vs one batch)", "grid --sync exact: bitwise", "assert_accumulation_equivalent"} <= mutated
    assert {"checkpoint verification", "replica check (compare_replicas)"} <= mutated
    # Every reproduced public cause of divergence is diagnosed, and its fix is a clean run.
    clean = {r["verdict"] for r in result["rows"] if r["clean"]}
    assert {f"diagnosis ({name})" for name in REPRODUCTIONS} <= mutated & clean
    assert len([v for v in mutated if " vs pitfall " in v]) == len(PITFALLS) + 3  # + the three DDP pitfalls
    for name in DEMOS:
        rows = [r for r in result["rows"] if r["verdict"] == f"demo {name}: claim" and not r["clean"]]
        assert any(r["mutant"].startswith("control ") for r in rows), name
        assert any(not r["mutant"].startswith("control ") for r in rows), f"{name} has no mutant"


def test_an_unknown_group_is_one_line_and_exit_2(tmp_path):
    proc = run_cli("selftest", "--only", "nope", "--out", str(tmp_path))
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "unknown group 'nope'" in proc.stderr
