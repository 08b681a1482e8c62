"""Streaming a checkpoint layer by layer gives what the in-memory path gives: the same logits, the same pruned
weights, the same perplexity; the files it writes are what transformers writes; a sharded and a single-file
source give the same output; an interrupted write leaves nothing; device and dtype are honoured or refused."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from tests.commands.test_errors import one_line_error

from upcycle import arch, hub
from upcycle.checkpoint import Checkpoint, LazyModel, ShardWriter
from upcycle.cli import main
from upcycle.config import RunOptions
from upcycle.eval import perplexity
from upcycle.pipelines import prune as prune_pipeline
from upcycle.pipelines.prune import PruneConfig, PruneSpec
from upcycle.pipelines.streaming import LayerPass

QUIET = RunOptions(progress=False)


def saved(tmp_path, family: str, name: str = "src", **tiny):
    folder = tmp_path / name
    hub.save(hub.tiny(family, **tiny), hub.byte_tokenizer(), folder)
    return folder


def all_tensors(folder) -> dict:
    ck = Checkpoint(folder)
    return ck.read(ck.names)


@pytest.mark.parametrize("family", arch.FAMILIES)
def test_a_lazy_model_loaded_layer_by_layer_computes_the_loaded_models_logits(tmp_path, family):
    folder = saved(tmp_path, family, layers=3)
    reference, _ = hub.load(folder)
    lazy = LazyModel(folder)
    lazy.load_outer()
    for i in range(lazy.num_layers):
        lazy.load_layer(i)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(reference(input_ids=ids).logits, lazy.model(input_ids=ids).logits)


def test_tensors_read_through_a_small_buffer_are_the_files_tensors_in_the_dtype_asked(tmp_path, monkeypatch):
    # a buffer of 24 bytes: every tensor below crosses several, and 7 fp32 values end mid-buffer
    monkeypatch.setattr("upcycle.checkpoint._READ_BUFFER_BYTES", 24)
    g = torch.Generator().manual_seed(0)
    stored = {
        "a": torch.randn(5, 7, generator=g),
        "b": torch.randn(3, generator=g).to(torch.bfloat16),
        "ids": torch.arange(11, dtype=torch.int64),
        "empty": torch.zeros(0, 4),
        "scalar": torch.tensor(2.5),
    }
    save_file(stored, tmp_path / "model.safetensors")
    ck = Checkpoint(tmp_path)
    as_stored = ck.read(ck.names)
    for name, t in load_file(tmp_path / "model.safetensors").items():
        assert as_stored[name].dtype == t.dtype and torch.equal(as_stored[name], t)
    in_bf16 = ck.read(ck.names, dtype=torch.bfloat16)
    assert torch.equal(in_bf16["a"], stored["a"].to(torch.bfloat16)) and in_bf16["ids"].dtype == torch.int64
    in_fp32 = ck.read(["b"], dtype=torch.float32)["b"]
    assert in_fp32.dtype == torch.float32 and torch.equal(in_fp32, stored["b"].float())


def test_a_pass_holds_no_embeddings_while_it_goes_up_the_layers(tmp_path):
    folder = saved(tmp_path, "llama", layers=2)
    reference, _ = hub.load(folder)
    lazy = LazyModel(folder)
    blocks = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with LayerPass(lazy, output={"x": blocks}) as p:
        for _ in p.layers():
            assert lazy.adapter.embedding().weight.device.type == "meta"
            assert lazy.adapter.lm_head().weight.device.type == "meta"
        logits = torch.cat(list(p.logits(p.output["x"])))
    with torch.no_grad():
        assert torch.allclose(logits, reference(input_ids=blocks).logits, rtol=1e-5, atol=1e-6)
    assert torch.equal(lazy.outer_state()["model.embed_tokens.weight"], reference.model.embed_tokens.weight)


def test_a_pass_off_a_terminal_logs_a_line_a_layer_and_none_when_progress_is_off(tmp_path, capsys):
    folder = saved(tmp_path, "llama", layers=3)
    capsys.readouterr()  # transformers' own bars while saving
    for progress, expected in ((True, 3), (False, 0)):
        with LayerPass(LazyModel(folder), progress=progress, desc="sparsify") as p:
            for _ in p.layers():
                pass
        captured = capsys.readouterr()  # capsys is not a terminal: tqdm draws no bar
        lines = captured.err.splitlines()
        assert captured.out == "" and len(lines) == expected
        assert [line.split(" in ")[0] for line in lines] == [f"sparsify: layer {i}/3" for i in range(1, expected + 1)]


@pytest.mark.parametrize("family", arch.FAMILIES)
def test_streamed_writes_are_the_files_transformers_writes(tmp_path, family):
    """Every tensor under the name and with the bytes that save_pretrained gives it (MoE experts split)."""
    folder = saved(tmp_path, family, layers=2)
    lazy = LazyModel(folder)
    with LayerPass(lazy, out=tmp_path / "out", shard_bytes=20_000) as p:
        for _ in p.layers():
            pass
        p.finish()
    ours, theirs = all_tensors(tmp_path / "out"), all_tensors(folder)
    assert sorted(ours) == sorted(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # sharded at this size
    reloaded, _ = hub.load(tmp_path / "out")  # and transformers reads the shards back
    assert type(reloaded).__name__.lower().startswith(family.replace("_", "")[:4])


@pytest.mark.parametrize(
    "family,spec",
    [
        ("llama", PruneSpec(method="sparsegpt", sparsity=0.5)),
        ("qwen2", PruneSpec(method="wanda", nm="2:4")),
        ("qwen3", PruneSpec(method="magnitude", sparsity=0.6, per="layer")),
        ("mistral", PruneSpec(method="sparsegpt", nm="2:4")),
        ("qwen2_moe", PruneSpec(method="wanda", sparsity=0.5)),
    ],
)
def test_streamed_prune_equals_the_in_memory_prune(tmp_path, text_folder, family, spec):
    folder = saved(tmp_path, family, layers=3)
    config = PruneConfig(spec=spec, calibration=str(text_folder), calibration_tokens=512, seq_len=64)
    out, report, stream = prune_pipeline.run_streamed(folder, tmp_path / "out", config, options=QUIET)
    model, tokenizer = hub.load(folder)
    pruned, expected = prune_pipeline.run(model, tokenizer, config, progress=False)
    written, state = all_tensors(out), pruned.state_dict()
    for name, tensor in written.items():
        if name in state:
            torch.testing.assert_close(tensor, state[name], rtol=1e-6, atol=1e-7, msg=name)
    assert report.matrices == expected.matrices and report.exact == expected.exact
    assert report.ppl_after == pytest.approx(expected.ppl_after, rel=1e-5)
    assert report.kl == pytest.approx(expected.kl, rel=1e-4, abs=1e-7)
    assert stream.layers == 3 and stream.peak_rss_mb > 0 and len(stream.layer_seconds) == 3


def test_a_prune_with_no_held_out_text_writes_the_same_weights_and_says_it_did_not_measure(tmp_path, text_folder):
    folder = saved(tmp_path, "llama", layers=2)
    spec = PruneSpec(method="sparsegpt", nm="2:4")
    measured = PruneConfig(spec=spec, calibration=str(text_folder), calibration_tokens=512, seq_len=64)
    a, with_held, _ = prune_pipeline.run_streamed(folder, tmp_path / "a", measured, options=QUIET)
    args = ["prune", str(folder), str(tmp_path / "b"), "--method", "sparsegpt", "--nm", "2:4", "--calibration",
            str(text_folder), "--calibration-tokens", "512", "--seq-len", "64", "--held-tokens", "0", "--no-progress"]  # fmt: skip
    assert main(args) == 0
    ta, tb = all_tensors(a), all_tensors(tmp_path / "b")
    assert sorted(ta) == sorted(tb) and all(torch.equal(ta[k], tb[k]) for k in ta)
    facts = json.loads((tmp_path / "b" / "prune_report.json").read_text())
    assert with_held.ppl_after is not None and facts["ppl_after"] is None
    assert "Not measured" in (tmp_path / "b" / "prune_report.md").read_text()


def test_a_sharded_and_a_single_file_source_prune_to_the_same_weights(tmp_path, text_folder):
    single = saved(tmp_path, "llama", layers=3)
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    for f in single.iterdir():
        if f.suffix != ".safetensors":
            (sharded / f.name).write_bytes(f.read_bytes())
    tensors = load_file(single / "model.safetensors")
    names, weight_map = sorted(tensors), {}
    for n, part in enumerate((names[: len(names) // 2], names[len(names) // 2 :])):
        file = f"model-0000{n + 1}-of-00002.safetensors"
        save_file({k: tensors[k] for k in part}, sharded / file, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(part, file)
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    config = PruneConfig(spec=PruneSpec(method="sparsegpt"), calibration=str(text_folder), calibration_tokens=512)
    a, *_ = prune_pipeline.run_streamed(single, tmp_path / "a", config, options=QUIET)
    b, *_ = prune_pipeline.run_streamed(sharded, tmp_path / "b", config, options=QUIET)
    ta, tb = all_tensors(a), all_tensors(b)
    assert sorted(ta) == sorted(tb) and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_an_interrupted_streamed_write_leaves_no_out(tmp_path, monkeypatch, text_folder):
    folder = saved(tmp_path, "qwen3", layers=3)
    calls = []

    def fail_at_layer_two(adapter, i, *args):
        calls.append(i)
        if i == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(prune_pipeline, "prune_layer", fail_at_layer_two)
    config = PruneConfig(calibration=str(text_folder), calibration_tokens=512)
    with pytest.raises(KeyboardInterrupt):
        prune_pipeline.run_streamed(folder, tmp_path / "out", config, options=QUIET)
    assert calls == [0, 1, 2]
    assert not [p.name for p in tmp_path.iterdir() if "out" in p.name]  # no OUT, no partial folder


def test_streamed_eval_is_the_in_memory_perplexity(tmp_path, capsys, text_folder):
    folder = saved(tmp_path, "qwen2", layers=3)
    args = ["--data", str(text_folder), "--seq-len", "32", "--max-blocks", "6", "--batch-size", "4", "--json"]
    assert main(["eval", str(folder), *args, "--no-progress"]) == 0
    result = json.loads(capsys.readouterr().out)
    model, tokenizer = hub.load(folder)
    from upcycle import data

    blocks = data.blocks(str(text_folder), tokenizer, "validation", 32, max_blocks=6)
    expected = perplexity(model, blocks, batch_size=4, progress=False)
    assert result["nll"] == pytest.approx(expected.nll, rel=1e-6) and result["tokens"] == expected.tokens
    assert result["stream"]["layers"] == 3 and result["stream"]["peak_rss_mb"] > 0


def test_bf16_is_honoured_and_said(tmp_path, capsys):
    folder = saved(tmp_path, "llama")
    assert main(["convert", str(folder), str(tmp_path / "bf16"), "--dtype", "bf16", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "in bf16" in out and "max |Δlogit| 0" in out
    written = all_tensors(tmp_path / "bf16")
    assert {t.dtype for t in written.values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for a machine without a GPU")
@pytest.mark.parametrize("verb", ["eval", "convert", "prune"])
def test_cuda_without_a_gpu_is_one_line(tmp_path, capsys, verb):
    folder = saved(tmp_path, "llama")
    args = [verb, str(folder)] + ([str(tmp_path / "out")] if verb != "eval" else []) + ["--device", "cuda"]
    err = one_line_error(args, capsys)
    assert "no CUDA GPU" in err and not (tmp_path / "out").exists()


def test_a_shard_size_below_one_byte_is_refused(tmp_path, capsys):
    assert "shard_size" in one_line_error(["convert", "tiny-llama", str(tmp_path / "o"), "--shard-size", "0"], capsys)
    with ShardWriter(tmp_path / "w", shard_bytes=1) as writer:  # one tensor a shard at the smallest size
        writer.add({"a": torch.ones(3), "b": torch.zeros(2)})
    assert len(list((tmp_path / "w").glob("model-*.safetensors"))) == 2


@pytest.mark.parametrize(
    "family,steps",
    [
        ("llama", [{"op": "hidden", "factor": 2, "noise": 0.01}]),
        ("qwen3", [{"op": "ffn_width", "width": 200, "noise": 0.02}]),
        ("qwen2_moe", [{"op": "ffn_width", "width": 96}, {"op": "hidden", "factor": 3}]),
        ("mixtral", [{"op": "depth", "add": 2}]),
        ("qwen2", [{"op": "depth", "at": [-1, 1]}, {"op": "depth", "layer_map": [0, 1, 1, 2, 3, 0]}]),
    ],
)
def test_streamed_grow_equals_the_in_memory_grow(tmp_path, text_folder, family, steps):
    from upcycle.pipelines import grow as grow_pipeline
    from upcycle.pipelines.grow import GrowConfig, GrowStep

    folder = saved(tmp_path, family, layers=3)
    checks = {"tolerance": 1e-3} if all(s["op"] != "depth" or "layer_map" not in s for s in steps) else {}
    config = GrowConfig(steps=[GrowStep(**s) for s in steps], calibration=str(text_folder), calibration_tokens=512,
                        seq_len=64, **({"checks": {"max_loss_change": 100.0, "min_logit_cosine": -1.0}} if not checks else {}))  # fmt: skip
    out, report, streams = grow_pipeline.run_streamed(folder, tmp_path / "out", config, options=QUIET)
    model, tokenizer = hub.load(folder)
    grown, expected = grow_pipeline.run(model, tokenizer, config, progress=False)
    written, state = all_tensors(out), grown.state_dict()
    reloaded, _ = hub.load(out)
    assert sorted(reloaded.state_dict()) == sorted(state)
    for name, tensor in reloaded.state_dict().items():
        torch.testing.assert_close(tensor, state[name], rtol=1e-6, atol=1e-7, msg=name)
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == grown.config.num_hidden_layers
    assert report.equivalence["max_abs_logit"] == pytest.approx(expected.equivalence["max_abs_logit"], abs=1e-5)
    assert len(streams) == len(steps) and not [p for p in tmp_path.iterdir() if ".step-" in p.name]
    assert len(written) >= len(state) - 1  # a tied head is written once


@pytest.mark.parametrize("predictor", ["shadow", "lowrank"])
def test_streamed_densify_equals_the_in_memory_densify(tmp_path, capsys, predictor):
    from upcycle.modules import BankSparsity, UpcycleSparseForCausalLM
    from upcycle.ops import densify

    sparse = UpcycleSparseForCausalLM.from_dense(
        hub.tiny("qwen2"), BankSparsity(32, 8, 16, predictor=predictor), [0, 1]
    )
    hub.save(sparse, hub.byte_tokenizer(), tmp_path / "sparse")
    assert main(["densify", str(tmp_path / "sparse"), str(tmp_path / "dense"), "--no-progress"]) == 0
    assert "dense vs sparse on random tokens" in capsys.readouterr().out
    reloaded, _ = hub.load(tmp_path / "dense")
    expected = densify(sparse).state_dict()
    assert type(reloaded).__name__ == "Qwen2ForCausalLM" and sorted(reloaded.state_dict()) == sorted(expected)
    assert all(torch.equal(v, expected[k]) for k, v in reloaded.state_dict().items())


@pytest.mark.parametrize(
    "family,cut",
    [
        ("llama", {"op": "depth", "layers": 2, "criterion": "block_influence"}),
        ("qwen3", {"op": "depth", "layers": 1, "criterion": "last"}),
        ("qwen2", {"op": "ffn_width", "width": 80}),
    ],
)
def test_streamed_slim_equals_the_in_memory_cut(tmp_path, text_folder, family, cut):
    from upcycle.pipelines import slim as slim_pipeline
    from upcycle.pipelines.slim import SlimConfig, SlimStage, SlimStep

    folder = saved(tmp_path, family, layers=4)
    config = SlimConfig(stages=[SlimStage(cuts=[SlimStep(**cut)])], calibration=str(text_folder),
                        calibration_tokens=512, seq_len=64)  # fmt: skip
    out, report, streams = slim_pipeline.run_streamed(folder, tmp_path / "out", config, options=QUIET)
    model, tokenizer = hub.load(folder)
    slim, expected = slim_pipeline.run(model, tokenizer, config, progress=False)
    reloaded, _ = hub.load(out)
    state = slim.state_dict()
    assert sorted(reloaded.state_dict()) == sorted(state)
    for name, tensor in reloaded.state_dict().items():
        torch.testing.assert_close(tensor, state[name], rtol=1e-6, atol=1e-7, msg=name)
    ours, theirs = report.cuts[0], expected.cuts[0]
    assert ours.removed.get("removed_layers") == theirs.removed.get("removed_layers")
    assert ours.removed.get("kept_neurons") == theirs.removed.get("kept_neurons")
    assert ours.params_after == theirs.params_after == sum(p.numel() for p in slim.parameters())
    assert ours.ppl_after == pytest.approx(theirs.ppl_after, rel=1e-5) and ours.kl == pytest.approx(theirs.kl, rel=1e-4)


@pytest.mark.slow
def test_streamed_prune_and_eval_on_smollm2_equal_the_in_memory_path(tmp_path):
    """The real model: Wanda 2:4 streamed from the cached checkpoint gives the in-memory weights bitwise, and
    the streamed perplexity of what was written is the in-memory perplexity of the pruned model."""
    config = PruneConfig(spec=PruneSpec(method="wanda", nm="2:4"), calibration_tokens=1024, held_tokens=512)
    out, report, stream = prune_pipeline.run_streamed("smollm2-135m", tmp_path / "out", config, options=QUIET)
    model, tokenizer = hub.load("smollm2-135m")
    pruned, expected = prune_pipeline.run(model, tokenizer, config, progress=False)
    written, state = all_tensors(out), pruned.state_dict()
    assert all(torch.equal(t, state[name]) for name, t in written.items())
    assert report.ppl_after == pytest.approx(expected.ppl_after, rel=1e-5) and stream.layers == 30
    from upcycle import data
    from upcycle.pipelines.streaming import open_source

    blocks = data.blocks("shakespeare", tokenizer, "validation", 128, max_blocks=4)
    lazy, _ = open_source(out, QUIET)
    with LayerPass(lazy, output={"eval": blocks}) as p:
        for _ in p.layers():
            pass
        streamed = p.perplexity("eval")
    assert streamed.nll == pytest.approx(perplexity(pruned, blocks, progress=False).nll, rel=1e-6)


@pytest.mark.parametrize(
    "family,step",
    [
        ("llama", {"op": "moe", "family": "qwen2_moe", "experts": 4, "top_k": 2, "mode": "shared"}),
        ("qwen3", {"op": "moe", "experts": 4, "top_k": 2, "mode": "copy", "router": "random"}),
        ("mistral", {"op": "moe", "family": "mixtral", "experts": 4, "top_k": 2, "mode": "drop", "drop_ratio": 0.5}),
        ("qwen2", {"op": "moe", "experts": 4, "top_k": 2, "mode": "granular", "granularity": 2}),
    ],
)
def test_streamed_dense_to_moe_equals_the_in_memory_grow(tmp_path, text_folder, family, step):
    from upcycle.pipelines import grow as grow_pipeline
    from upcycle.pipelines.grow import GrowConfig, GrowStep

    folder = saved(tmp_path, family, layers=3)
    config = GrowConfig(steps=[GrowStep(**step)], calibration=str(text_folder), calibration_tokens=512, seq_len=64,
                        checks={"max_loss_change": 100.0, "min_logit_cosine": -1.0, "max_router_kl": 100.0})  # fmt: skip
    out, report, _ = grow_pipeline.run_streamed(folder, tmp_path / "out", config, options=QUIET)
    model, tokenizer = hub.load(folder)
    grown, expected = grow_pipeline.run(model, tokenizer, config, progress=False)
    reloaded, _ = hub.load(out)
    state = grown.state_dict()
    assert type(reloaded) is type(grown) and sorted(reloaded.state_dict()) == sorted(state)
    for name, tensor in reloaded.state_dict().items():
        torch.testing.assert_close(tensor, state[name], rtol=1e-6, atol=1e-7, msg=name)
    assert report.reports[0].kind == expected.reports[0].kind
    assert report.equivalence["max_abs_logit"] == pytest.approx(expected.equivalence["max_abs_logit"], abs=1e-5)


@pytest.mark.parametrize(
    "family,options",
    [
        ("llama", {"bank": 32, "keep": 8}),  # the default: GPTQ shadow, layer-wise conversion
        ("qwen2", {"bank": 32, "keep": 8, "predictor": "lowrank", "rank": 8, "warmup_steps": 5, "layers": [0, 2]}),
        ("qwen3", {"bank": 32, "keep": 8, "selection": "threshold", "permute": True, "convert_steps": 0}),
        ("mistral", {"bank": 48, "keep": 12, "pad": True, "quantizer": "rtn", "convert_steps": 3}),
    ],
)
def test_streamed_sparsify_equals_the_in_memory_sparsify(tmp_path, text_folder, family, options):
    from upcycle.pipelines import sparsify as sparsify_pipeline
    from upcycle.pipelines.sparsify import SparsifyConfig

    folder = saved(tmp_path, family, layers=3)
    config = SparsifyConfig(calibration=str(text_folder), calibration_tokens=512, seq_len=64,
                            convert_rows=64, **{"convert_steps": 4} | options)  # fmt: skip
    out, report, stream, reloaded = sparsify_pipeline.run_streamed(folder, tmp_path / "out", config, options=QUIET)
    model, tokenizer = hub.load(folder)
    sparse, expected = sparsify_pipeline.run(model, tokenizer, config, progress=False)
    written, state = all_tensors(out), sparse.state_dict()
    assert set(written) == set(state) - ({"lm_head.weight"} if model.config.tie_word_embeddings else set())
    for name, tensor in written.items():
        torch.testing.assert_close(tensor, state[name], rtol=1e-5, atol=1e-6, msg=name)
    for key in ("recall_init", "recall", "density", "convert_error_before", "convert_error_after"):
        assert getattr(report, key) == pytest.approx(getattr(expected, key), rel=1e-4, abs=1e-6), key
    assert report.equivalence["mean_kl"] == pytest.approx(expected.equivalence["mean_kl"], rel=1e-3, abs=1e-7)
    assert reloaded.max_abs_logit == 0.0  # the folder reads back to the model as it was held
    back, _ = hub.load(out)  # and transformers loads it as the in-memory model's own save would be
    assert type(back).__name__ == "UpcycleSparseForCausalLM" and back.config.sparsity == sparse.config.sparsity


def test_a_bf16_streamed_sparsify_reads_back_to_the_model_it_held(tmp_path, text_folder):
    """In bf16 the GPTQ shadow's input moment stays fp32, written and read back so: rounded to bf16, the
    reloaded model's shadow would be another quantization (and at hidden 4608 its H not positive-definite)."""
    from upcycle.pipelines import sparsify as sparsify_pipeline
    from upcycle.pipelines.sparsify import SparsifyConfig

    folder = saved(tmp_path, "llama", layers=2)
    config = SparsifyConfig(bank=32, keep=8, calibration=str(text_folder), calibration_tokens=512, seq_len=64,
                            convert_steps=3, convert_rows=64)  # fmt: skip
    options = RunOptions(progress=False, dtype="bf16")
    out, report, stream, reloaded = sparsify_pipeline.run_streamed(folder, tmp_path / "out", config, options=options)
    assert stream.dtype == "bf16" and reloaded.max_abs_logit == 0.0 and reloaded.top1_agreement == 1.0
    written = all_tensors(out)
    assert written["model.layers.0.mlp.predictor.input_moment"].dtype == torch.float32
    assert written["model.layers.0.mlp.gate_proj.weight"].dtype == torch.bfloat16
    back, _ = hub.load(out, dtype=torch.bfloat16)
    assert back.model.layers[1].mlp.predictor.input_moment.dtype == torch.float32


@pytest.mark.slow
@pytest.mark.parametrize(
    "verb,step",
    [
        ("grow", {"op": "moe", "family": "qwen2_moe", "experts": 4, "top_k": 2, "mode": "shared"}),
        ("grow", {"op": "depth", "add": 2}),
        ("slim", {"op": "ffn_width", "width": 1024}),
        ("slim", {"op": "depth", "layers": 4, "criterion": "block_influence"}),
    ],
)
def test_streamed_grow_and_slim_on_smollm2_equal_the_in_memory_path(tmp_path, verb, step):
    """The real model, streamed from the cached checkpoint, against the in-memory verb: every tensor written is
    the in-memory model's, and the figures each verb reports agree."""
    from upcycle.pipelines import grow as grow_pipeline
    from upcycle.pipelines import slim as slim_pipeline
    from upcycle.pipelines.grow import GrowConfig, GrowStep
    from upcycle.pipelines.slim import SlimConfig, SlimStage, SlimStep

    if verb == "grow":
        pipeline, config = grow_pipeline, GrowConfig(steps=[GrowStep(**step)], calibration_tokens=512, seq_len=128)
    else:
        pipeline = slim_pipeline
        config = SlimConfig(stages=[SlimStage(cuts=[SlimStep(**step)])], calibration_tokens=512, seq_len=128)
    out, report, _ = pipeline.run_streamed("smollm2-135m", tmp_path / "out", config, options=QUIET)
    model, tokenizer = hub.load("smollm2-135m")
    changed, expected = pipeline.run(model, tokenizer, config, progress=False)
    reloaded, _ = hub.load(out)
    state = changed.state_dict()
    assert type(reloaded) is type(changed) and sorted(reloaded.state_dict()) == sorted(state)
    for name, tensor in reloaded.state_dict().items():
        torch.testing.assert_close(tensor, state[name], rtol=1e-6, atol=1e-7, msg=name)
    if verb == "grow":
        assert report.equivalence["max_abs_logit"] == pytest.approx(expected.equivalence["max_abs_logit"], abs=1e-4)
    else:
        ours, theirs = report.cuts[0], expected.cuts[0]
        assert ours.ppl_after == pytest.approx(theirs.ppl_after, rel=1e-5)
        assert ours.kl == pytest.approx(theirs.kl, rel=1e-4)


@pytest.mark.slow
def test_streamed_sparsify_and_densify_on_smollm2_equal_the_in_memory_path(tmp_path, capsys):
    """Sparsify (GPTQ shadow, two layers converted) streamed from the real checkpoint gives the in-memory
    model's tensors and figures; densifying what was written gives the in-memory densify's weights bitwise."""
    from upcycle.ops import densify
    from upcycle.pipelines import sparsify as sparsify_pipeline
    from upcycle.pipelines.sparsify import SparsifyConfig

    config = SparsifyConfig(bank=64, keep=16, layers=[0, 15], calibration_tokens=1024, seq_len=128,
                            convert_steps=3, convert_rows=64)  # fmt: skip
    out, report, _, reloaded = sparsify_pipeline.run_streamed("smollm2-135m", tmp_path / "sparse", config,
                                                              options=QUIET)  # fmt: skip
    model, tokenizer = hub.load("smollm2-135m")
    sparse, expected = sparsify_pipeline.run(model, tokenizer, config, progress=False)
    written, state = all_tensors(out), sparse.state_dict()
    for name, tensor in written.items():
        torch.testing.assert_close(tensor, state[name], rtol=1e-5, atol=1e-6, msg=name)
    for key in ("recall", "convert_error_before", "convert_error_after"):
        assert getattr(report, key) == pytest.approx(getattr(expected, key), rel=1e-4, abs=1e-6), key
    assert reloaded.max_abs_logit == 0.0
    assert main(["densify", str(out), str(tmp_path / "dense"), "--no-progress"]) == 0
    dense, _ = hub.load(tmp_path / "dense")
    held, _ = hub.load(out)
    expected_dense = densify(held).state_dict()
    assert type(dense).__name__ == "LlamaForCausalLM"
    assert all(torch.equal(v, expected_dense[k]) for k, v in dense.state_dict().items())
