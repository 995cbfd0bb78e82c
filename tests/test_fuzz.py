"""Hostile and broken input never crashes grokconv (issue 12): seeded mutations of every reader's inputs,
each run through the real command line (tests/fuzz_harness.py). CI runs a few hundred cases within a
time budget; ``make fuzz`` runs thousands (FUZZ_CASES, FUZZ_SEED, FUZZ_WORKERS, FUZZ_TIME)."""
from __future__ import annotations

import os

import pytest

import fuzz_harness as fh

CASES = int(os.environ.get("FUZZ_CASES", 300))
SEED = int(os.environ.get("FUZZ_SEED", 0))
BUDGET = float(os.environ.get("FUZZ_TIME", 40))
WORKERS = int(os.environ.get("FUZZ_WORKERS", 2))


@pytest.fixture(scope="module")
def fuzz_env(tmp_path_factory):
    work = tmp_path_factory.mktemp("fuzz")
    inputs = fh.build_inputs(work)
    return inputs, work / "scratch", fh.baselines(inputs, work / "scratch")


def _explain(report) -> str:
    lines = [report.summary()]
    for r in report.failures[:10]:
        lines.append(f"  {fh.Case(**r['case']).key()}: {r['failures'][:2]}")
        lines.append(f"    corpus entry: {fh.json.dumps({k: v for k, v in r['case'].items() if v not in ('', None)})}")
    return "\n".join(lines)


def test_every_kind_and_command_is_in_the_table(fuzz_env):
    inputs, _, base = fuzz_env
    assert set(inputs) == set(fh.KINDS) and set(base) == set(fh.KINDS)
    for k in fh.INPUTS:
        assert set(k.commands) <= set(fh.COMMANDS)
        assert all(list(inputs[k.name].glob(p)) for p in k.files), k.name   # every pattern finds files
        assert set(base[k.name]) == set(k.commands)


def test_corpus_and_seeded_mutations_end_in_success_or_one_clear_error(fuzz_env):
    """The corpus of past failures first, then seeded cases as long as the time budget lasts."""
    inputs, scratch, base = fuzz_env
    corpus = fh.load_corpus()
    assert any("UnicodeDecodeError" in c.note for c in corpus)
    cases = corpus + fh.seeded_cases(CASES, SEED, inputs)
    report = fh.run_cases(cases, inputs, scratch, workers=WORKERS, budget=BUDGET, baseline=base)
    print("\n" + report.summary())
    assert not report.failures, _explain(report)
    ran = {fh.Case(**r["case"]).key() for r in report.results}
    assert {c.key() for c in corpus} <= ran
    assert len(ran) - len(corpus) >= min(CASES, 60), f"only {len(ran) - len(corpus)} cases ran in {BUDGET:.0f} s"
    kinds = {r["case"]["kind"] for r in report.results}
    assert kinds == set(fh.KINDS), f"kinds never drawn: {set(fh.KINDS) - kinds}"
    outcomes = {o for r in report.results for o in r["outcomes"].values()}
    assert {"ok", "error", "problems"} <= outcomes          # every way out was exercised


def test_the_harness_catches_a_traceback_a_hang_and_a_crash(fuzz_env, monkeypatch):
    """The guards themselves: the issue's UnicodeDecodeError (the walker as it was), a case that never
    ends, a worker that dies."""
    inputs, scratch, base = fuzz_env
    import grokconv.formats.pickle_walk as pw
    case = next(c for c in fh.load_corpus() if c.note.startswith("issue 12: the last byte"))
    monkeypatch.setattr(pw._Reader, "text", lambda self, n, at: self.read(n).decode("utf-8"))
    res = fh.run_case(case, inputs, scratch, base["jax"])
    assert res["outcomes"] == {"inspect": "traceback", "to-safetensors": "traceback"}
    assert "UnicodeDecodeError" in res["failures"][0]
    monkeypatch.undo()
    fixed = fh.run_case(case, inputs, scratch, base["jax"])
    assert fixed["outcomes"] == {"inspect": "problems", "to-safetensors": "error"} and not fixed["failures"]
    guards = [fh.Case("jax", "grokconv-config.json", "selftest-hang", 0), fh.Case("jax", "grokconv-config.json",
                                                                                   "selftest-crash", 0)]
    report = fh.run_cases(guards, inputs, scratch, workers=2, timeout=5)
    got = sorted(f for r in report.results for f in r["failures"])
    assert len(got) == 2 and got[0].startswith("crash: the worker died") and got[1].startswith("hang: no result")
