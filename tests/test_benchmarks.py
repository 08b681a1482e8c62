"""Every benchmark script still starts (its --help), and the harness they share does what it says."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from upcycle import hub
from upcycle.eval import perplexity

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import harness  # noqa: E402  (the scripts' shared module, found as they find it: beside them)

SCRIPTS = sorted(p.name for p in BENCHMARKS.glob("*.py") if p.name != "harness.py")


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_benchmark_starts(script):
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--help"], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0 and proc.stdout.startswith("usage:"), proc.stderr[-2000:]


def test_score_is_perplexity_per_corpus_and_token_weighted_together():
    model = hub.tiny("llama")
    val = {"a": torch.randint(0, 256, (2, 16)), "b": torch.randint(0, 256, (3, 16))}
    scores = harness.score(model, val, digits=6)
    runs = {k: perplexity(model, v, progress=False) for k, v in val.items()}
    assert scores["a"] == pytest.approx(runs["a"].ppl, rel=1e-5) and scores["b"] == pytest.approx(
        runs["b"].ppl, rel=1e-5
    )
    both = torch.tensor(sum(r.nll * r.tokens for r in runs.values()) / sum(r.tokens for r in runs.values())).exp()
    assert scores["both"] == pytest.approx(float(both), rel=1e-5)


def test_a_child_returns_what_it_wrote_or_its_last_error_line(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(
        "import json, sys\n"
        "if sys.argv[2] == 'fail': raise SystemExit('it failed: bad input')\n"
        "open(sys.argv[-1], 'w').write(json.dumps({'got': sys.argv[2]}))\n"
    )
    assert harness.child(str(script), "x") == {"got": "x"}
    assert harness.child(str(script), "fail") == {"error": "it failed: bad input"}


def test_results_record_how_they_were_made(tmp_path, monkeypatch):
    monkeypatch.setattr(harness, "RESULTS", tmp_path)
    path = harness.save("example", {"figure": 1.5})
    saved = json.loads(path.read_text())
    assert saved["figure"] == 1.5 and harness.load("example")["figure"] == 1.5
    run = saved["run"]
    assert run["command"].startswith("python") and run["machine"] and run["threads"] >= 1
    assert run["commit"] is None or len(run["commit"]) >= 7


def test_paired_verdicts_follow_the_per_seed_differences_worked_by_hand():
    # differences +2, +4, +3: mean 3, sample spread 1 -> all agree and 3 > 2 x 1
    strong = harness.paired([12, 14, 13], [10, 10, 10])
    assert strong["verdict"] == "reproduced" and strong["agree"] == "3/3"
    assert strong["mean"] == pytest.approx(3.0) and strong["spread"] == pytest.approx(1.0)
    # +1, +5, +0.5: all agree, mean 2.17 < 2 x spread 2.47 -> narrowly
    assert harness.paired([11, 15, 10.5], [10, 10, 10])["verdict"] == "narrowly"
    assert harness.paired([9, 11, 12], [10, 10, 10]) | {"diffs": None} == {
        "verdict": "mixed", "diffs": None, "mean": pytest.approx(2 / 3), "spread": pytest.approx(1.5275, abs=1e-4),
        "agree": "2/3",
    }  # fmt: skip
    # lower is better (perplexity): 20 vs 25 favours the first in every seed
    assert harness.paired([20, 21, 19], [25, 26, 24], higher_better=False)["verdict"] == "reproduced"
    assert harness.paired([25, 26, 24], [20, 21, 19], higher_better=False)["verdict"] == "not reproduced"
    assert harness.paired([1, 1], [1, 1])["verdict"] == "tied"
    with pytest.raises(ValueError):
        harness.paired([1, 2, 3], [1, 2])


def test_reproduce_keeps_a_finished_part_and_stamps_every_claim(tmp_path, monkeypatch):
    import reproduce  # noqa: E402  (beside harness)

    calls = []

    def part():
        calls.append(1)
        claim = {"paper": "fake", "claim": "a beats b", "verdict": "reproduced", "seeds": [0, 1, 2],
                 "margin": harness.paired([2, 3, 4], [1, 1, 1]), "figures": {"a": [2, 3, 4], "b": [1, 1, 1]}}  # fmt: skip
        return {"setup": {"n": 3}}, [claim]

    monkeypatch.setattr(harness, "RESULTS", tmp_path)
    monkeypatch.setattr(reproduce, "PARTS", {"fake": part})
    for argv in (["--paper", "fake"], ["--paper", "fake"], ["--paper", "fake", "--redo"]):
        monkeypatch.setattr(sys, "argv", ["reproduce.py", *argv])
        reproduce.main()
    assert len(calls) == 2  # the second run kept the finished part
    claims = json.loads((tmp_path / "claims.json").read_text())
    assert [c["paper"] for c in claims["claims"]] == ["fake"]  # re-run: replaced, not appended
    claim = claims["claims"][0]
    assert (
        claim["command"] == "python benchmarks/reproduce.py --paper fake" and "commit" in claim and "seconds" in claim
    )
    assert claims["parts"]["fake"]["finished"] and claims["fake"] == {"setup": {"n": 3}}
    assert "| fake | a beats b | **reproduced** | 3/3 |" in reproduce.table(claims)
