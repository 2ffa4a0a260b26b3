"""Claim: every verdict distshare gives has a mutant that flips it, and every mutant is caught
(`distshare selftest`); the clean runs pass, so a verdict that fails everything cannot hide in
the table either.

The catalogue is checked once in the suite, group by group. The command runs here (in a fresh
process, as a user runs it) on the groups no other module runs: verify, grid, accounting,
checkpoint. The other four groups' runs are the very worlds other modules already start: those
modules build the selftest's rows from their own outcomes with the functions the command uses
(`replica_rows_of`, `diagnosis_rows_of`, `pitfall_rows_of`, `demo_claim_rows`,
`demo_mutant_row`) and check that every row is caught, instead of the suite running each
catalogue twice.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
from conftest import rank0_json, read_result, run_cli

from distshare.cli import main
from distshare.testing import selftest as catalogue
from distshare.testing.selftest import GROUPS, VERIFY_MUTANTS, Row

HERE = ("verify", "grid", "accounting", "checkpoint")
ACCOUNTING = "each sample once (1 process, k=2)"
# group -> (the function its runner builds its rows with, the test modules that build them too)
ELSEWHERE = {
    "replicas": (["replica_rows_of"], ["test_faults.py"]),
    "diagnosis": (["diagnosis_rows_of"], ["test_divergences.py", "test_hsdp_replicas.py"]),
    "pitfalls": (["pitfall_rows_of"], ["test_pitfalls.py"]),
    "demos": (
        ["demo_claim_rows", "demo_mutant_row"],
        ["test_demos.py", "test_demo_weights.py", "test_demo_attention.py"],
    ),
}


@pytest.fixture(scope="module")
def selftest(tmp_path_factory):
    out = tmp_path_factory.mktemp("selftest")
    only = ",".join(HERE)
    proc = run_cli("selftest", "--only", only, "--json", "--no-progress", "--out", str(out), timeout=1800)
    return proc, out


@pytest.mark.slow
@pytest.mark.timeout(1200)  # the groups run in this test's setup: about 2 minutes on 2 idle cores
def test_every_mutant_is_caught_and_every_clean_run_passes(selftest):
    proc, out = selftest
    result = rank0_json(proc)
    missed = [f"{r['verdict']} x {r['mutant']}: {r['detail']}" for r in result["rows"] if not r["caught"]]
    assert missed == [] and proc.returncode == 0
    assert result["ok"] and result["caught"] == result["mutants"] and result["mutation_score"] == 1.0
    assert result["groups"] == list(HERE) and {r["group"] for r in result["rows"]} == set(HERE)
    assert read_result(out) == result  # written, and readable again
    assert "Mutation score" in (out / "report.md").read_text()


@pytest.mark.slow
@pytest.mark.timeout(1200)  # when run alone, the groups run in this test's setup
def test_every_verdict_has_a_mutant(selftest):
    result = rank0_json(selftest[0])
    mutated = {r["verdict"] for r in result["rows"] if not r["clean"]}
    for check in set(VERIFY_MUTANTS.values()):
        assert f"verify: {check}" in mutated
    assert "verify --sync exact: equals one big batch" in mutated
    assert {"grid (W=1, k=2 vs one batch)", "grid --sync exact: bitwise", "assert_accumulation_equivalent"} <= mutated
    assert {ACCOUNTING, "checkpoint verification"} <= mutated


def test_every_group_is_checked_once_here_or_beside_the_worlds_it_runs():
    """The other groups: their runners build rows with the functions those modules call on
    their own outcomes. A new group, or a runner that stops using its row function, fails here."""
    assert sorted((*HERE, *ELSEWHERE)) == sorted(GROUPS)
    tests = Path(__file__).parent
    for group, (builders, modules) in ELSEWHERE.items():
        runner = inspect.getsource(catalogue.RUNNERS[group])
        for builder in builders:
            assert f"{builder}(" in runner, f"the {group} runner does not build its rows with {builder}"
            assert any(f"{builder}(" in (tests / m).read_text() for m in modules), f"no test builds {builder}'s rows"
        for module in modules:
            assert any(f"{b}(" in (tests / module).read_text() for b in builders), module


@pytest.mark.parametrize(
    ("row", "status"),
    [
        (Row("accounting", ACCOUNTING, "a skipped micro-batch", False, "all counted", 0.0), "MISSED"),
        (Row("accounting", ACCOUNTING, "none (clean run)", False, "2 missing", 0.0, True), "FAILS"),
    ],
    ids=["a mutant missed", "a clean run failing"],
)
def test_a_missed_mutant_or_a_failing_clean_run_makes_the_command_fail(row, status, monkeypatch, tmp_path, capsys):
    # The mutants of the table itself: a verdict that stops failing, one that stops passing.
    caught = Row("accounting", ACCOUNTING, "a repeated sample", True, "1 twice", 0.0)
    monkeypatch.setitem(catalogue.RUNNERS, "accounting", lambda out: [caught, row])
    assert main(["selftest", "--only", "accounting", "--no-progress", "--out", str(tmp_path)]) == 1
    shown = capsys.readouterr().out
    assert f"{status:<7} {row.mutant}" in shown and "distshare selftest: FAILED" in shown
    result = read_result(tmp_path)
    assert result["ok"] is False and result["mutants"] == 1 + (not row.clean)
    assert status in (tmp_path / "report.md").read_text()


def test_an_unknown_group_is_one_line_and_exit_2(tmp_path):
    proc = run_cli("selftest", "--only", "nope", "--out", str(tmp_path))
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "unknown group 'nope'" in proc.stderr
