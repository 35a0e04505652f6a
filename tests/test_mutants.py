"""The mutation check's list stays in step with the code, and (slow) every planted defect is caught."""
import pytest

from train.experiments import mutants as M


def test_every_planted_line_exists_exactly_once():
    assert M.check_planted() == []
    assert len(M.MUTANTS) >= 20
    # each mutant really changes its file
    assert all(m.old != m.new and m.tests for m in M.MUTANTS)


def test_unknown_mutant_is_refused(capsys):
    assert M.main(["--only", "nope"]) == 2
    assert "unknown mutant" in capsys.readouterr().err


@pytest.mark.slow
def test_every_mutant_is_killed():
    results = M.run(M.MUTANTS, log=lambda line: None)
    survivors = [r["name"] for r in results if not r["status"].startswith("killed")]
    assert not survivors, survivors
