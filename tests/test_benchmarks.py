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


def test_slim_claims_judge_the_expert_cuts_as_worked_by_hand(monkeypatch):
    import reproduce  # noqa: E402  (beside harness)

    seeds = {arm: [100.0, 102.0, 101.0] for arm in ("pruned_kd_lm", "pruned_kd", "pruned_lm", "progressive")}
    seeds |= {"pruned_kd_lm_mtp": [99.0, 101.0, 100.0], "scratch": [9000.0]}
    one = {"source_ppl": 20.0, "reap/prune": {"ppl": 30.0}, "frequency/prune": {"ppl": 40.0}}

    def recovered(values):
        return [{"ppl": v, "one_shot_ppl": 0.0} for v in values]

    experts = {  # frequency's one-shot gap 40/30 - 1 = 33 %; recovered: +0.1, -0.1, +0.05 -> mixed, tiny gap
        "one_shot": one,
        "recovered": {
            "reap/prune": recovered([22.0, 22.0, 22.0]),
            "frequency/prune": recovered([22.1, 21.9, 22.05]),
            "reap/partial": recovered([21.0, 21.5, 21.2]),
        },
    }
    monkeypatch.setattr(reproduce, "slim_dense", lambda: {"seeds": seeds})
    monkeypatch.setattr(reproduce, "slim_experts", lambda: experts)
    _, claims = reproduce.slim_part()
    by = {c["claim"].split(" (")[0]: c for c in claims}
    assert by["pruned + KD + LM beats the same architecture from scratch"]["margin"]["diffs"] == [8900.0]
    assert by["KD + LM beats KD alone"]["verdict"] == "tied"
    assert by["MTP distillation"]["verdict"] == "reproduced"  # 1 lower in every seed, no spread
    assert by["REAP's one-shot expert cut costs less than frequency's"]["verdict"] == "reproduced"
    partial = next(c for c in claims if c["claim"].startswith("a partial-preservation merge"))
    assert partial["margin"]["diffs"] == pytest.approx([1.0, 0.5, 0.8]) and partial["verdict"] == "reproduced"
    converge = next(c for c in claims if c["claim"].startswith("expert criteria converge"))
    assert converge["verdict"] == "reproduced"
    assert converge["margin"]["gap_one_shot"] == pytest.approx(1 / 3)
    # recovered no closer than one shot: not converged
    experts["recovered"]["frequency/prune"] = recovered([30.0, 31.0, 29.0])
    _, claims = reproduce.slim_part()
    assert next(c for c in claims if c["claim"].startswith("expert criteria converge"))["verdict"] == "not reproduced"


def test_the_lineage_and_expert_tables_show_the_figures_given():
    import reproduce  # noqa: E402

    check = {"max_dlogit": 2.5e-5, "loss_change": 0.0001, "passed": True}
    lineage = {
        "steps": [
            {
                "step": "moe",
                "kind": "changed",
                "params_before": 134.5e6,
                "params_after": 214.3e6,
                "preservation": check | {"max_dlogit": 7.0, "loss_change": 0.35},
            },
            {
                "step": "experts x2",
                "kind": "exact",
                "params_before": 214.3e6,
                "params_after": 300.0e6,
                "preservation": check,
            },
        ],  # fmt: skip
        "ppl": [
            {"stage": 0, "when": "start (after growth)", "ppl": 30.1},
            {"stage": 0, "when": "end (trained)", "ppl": 19.4},
            {"stage": 1, "when": "start (after growth)", "ppl": 19.4},
            {"stage": 1, "when": "end (trained)", "ppl": 18.2},
        ],  # fmt: skip
        "train_seconds": 1800,
    }
    table = reproduce.lineage_table({"grow": {"lineage": lineage}})
    assert "| 2 | experts x2 | exact | 214.3M → 300.0M | 2.5e-05 | +0.01 % | passed | 19.40 | 18.20 |" in table
    assert "| 1 | moe | changed | 134.5M → 214.3M | 7 | +35.00 % | passed | 30.10 | 19.40 |" in table
    assert "Not run yet" in reproduce.lineage_table({})


def test_the_front_names_each_llamacpp_row_no_upcycle_row_matches():
    """A hand-worked front: Q8_0 is matched (sparse int8 faster, ppl within 1 % on both corpora), F16 is not
    (the only faster row is 2.5 % worse on one corpus), and the sparse model is not past Q4_0, the fastest."""
    import cpu_decode

    result = {
        "tok_s": {"llamacpp_f16": 100.0, "llamacpp_q8_0": 150.0, "llamacpp_q4_0": 300.0,
                  "upcycle_dense_bf16": 90.0, "upcycle_sparse_int8": 160.0, "upcycle_sparse_int4": 250.0},
        "ppl": {"llamacpp_f16": {"a": 9.85, "b": 5.0}, "llamacpp_q8_0": {"a": 10.0, "b": 5.0},
                "llamacpp_q4_0": {"a": 11.0, "b": 5.5},
                "dense_bf16": {"a": 10.0, "b": 5.0}, "sparse_int8": {"a": 10.1, "b": 5.02},
                "sparse_int4": {"a": 10.2, "b": 5.1}},
    }  # fmt: skip
    front = cpu_decode.front(result)
    assert front["matched_by"]["llamacpp_q8_0"] == ["sparse_int8"]
    assert front["matched_by"]["llamacpp_f16"] == []  # dense_bf16 is slower; sparse_int8 2.5 % worse on "a"
    assert front["matched_by"]["llamacpp_q4_0"] == []  # nothing as fast
    assert front["dominated_by_llamacpp"] == ["llamacpp_f16", "llamacpp_q4_0"]
    assert front["sparse_past_fastest_llamacpp"] is False


def test_a_finished_run_outlasts_its_folder_through_the_ledger_and_settings_still_decide(tmp_path, monkeypatch):
    monkeypatch.setattr(harness, "LEDGER", tmp_path / "ledger.json")
    folder = tmp_path / "runs" / "arm-s0"
    folder.mkdir(parents=True)
    (folder / "report.json").write_text(json.dumps({"ppl": 12.5}))
    harness.mark(folder, {"lr": 1e-3}, "report.json")
    for made in folder.iterdir():  # a fresh checkout: runs/ is not committed
        made.unlink()
    folder.rmdir()
    assert harness.reused(folder, {"lr": 3e-4}, "report.json") is None  # other settings: made again
    assert harness.reused(folder, {"lr": 1e-3}, "other.json") is None
    assert harness.reused(folder, {"lr": 1e-3}, "report.json") == {"ppl": 12.5}
    assert json.loads((folder / "report.json").read_text()) == {"ppl": 12.5}  # restored, so readers find it
    monkeypatch.setattr(harness, "LEDGER", None)  # a script that keeps no ledger records nothing
    harness.mark(folder, {"lr": 1e-3}, "report.json")
    assert len(json.loads((tmp_path / "ledger.json").read_text())) == 1
