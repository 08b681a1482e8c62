"""The demo end to end on a tiny model: every step runs and the report holds the sparsify table."""

import json

from upcycle.commands.demo import DemoConfig, run


def test_the_demo_runs_every_step_on_a_tiny_model(tmp_path, tmp_cache):
    report = run(
        DemoConfig(
            out=str(tmp_path / "demo"),
            model="tiny-llama",
            max_blocks=1,
            seq_len=32,
            sparse_tokens=2048,
            convert_steps=2,
        )
    )
    text = report.read_text()
    assert "Sparsify: 16 of every 64 FFN channels" in text and "dense, trained" in text
    metrics = json.loads((tmp_path / "demo" / "metrics.json").read_text())
    ppl = metrics["sparsify"]["ppl"]
    assert set(ppl) == {"dense", "oracle 16/64", "sparse, converted", "dense, trained", "sparse, trained"}
    assert metrics["sparsify"]["sparse_vs_dense_trained"] == round(ppl["sparse, trained"] / ppl["dense, trained"], 3)
    assert "Grow: dense → mixture of experts" in text
    grow = metrics["grow"]
    assert (
        grow["kind"] == "exact" and grow["preservation"]["max_dlogit"] <= 1e-4 and grow["params"][1] > grow["params"][0]
    )
    assert (tmp_path / "demo" / "grown" / "config.json").exists()
    slim = metrics["slim"]
    assert "Slim: fewer layers" in text and slim["params_after"] < slim["params_before"]
    assert len(slim["removed"]["removed_layers"]) == 1  # a fifth of the tiny model's 2 layers, at least one
    prune = metrics["prune"]
    assert "Prune and fine-tune sparse" in text and prune["exact"] and prune["seft"]["sparsity_exact"]
    assert abs(prune["sparsity"] - 0.5) < 0.01 and (tmp_path / "demo" / "seft" / "config.json").exists()
