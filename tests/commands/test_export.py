"""upcycle export: a GGUF file llama.cpp reads as the model it came from.

Always checked, with the gguf package's reader: the names, shapes and types llama.cpp expects, the values
(f32: exact; q8_0: within half a quantization step), the metadata and the tokenizer. Where llama-cpp-python
is installed, llama.cpp loads each file and its logits are compared with transformers'."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from upcycle import hub
from upcycle.errors import ConfigError
from upcycle.pipelines.export import ExportConfig, export

gguf = pytest.importorskip("gguf")

FAMILIES = ("llama", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "mixtral")


@pytest.fixture(scope="module")
def tokenizer():
    """SmolLM2's byte-level BPE tokenizer (49,152 ids, merges, chat template): what a real export carries."""
    return AutoTokenizer.from_pretrained(hub.builtin_folder("smollm2-135m"))


@pytest.fixture(scope="module")
def bytes_tokenizer():
    """The tiny models' byte tokenizer (257 ids in a 264-row vocabulary: the padding ids are written too). The
    file checks use it: the gguf reader parses SmolLM2's 49k tokens and merges in seconds a file."""
    return hub.byte_tokenizer()


def tiny_folder(family: str, tokenizer, folder, **fields):
    model = hub.tiny(family, vocab=max(len(tokenizer), hub.TINY_VOCAB), hidden=64, layers=2)
    for key, value in fields.items():
        setattr(model.config, key, value)
    hub.save(model, tokenizer, folder)
    return model


def read(path):
    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    return reader, tensors


def value(t) -> np.ndarray:
    """A tensor of the file as float32 in numpy's (row-major) shape."""
    return gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed([int(d) for d in t.shape])))


def field(reader, key):
    return reader.fields[key].contents()


@pytest.mark.parametrize("family", FAMILIES)
def test_every_tensor_is_where_llama_cpp_reads_it_with_its_values(family, bytes_tokenizer, tmp_path):
    model = tiny_folder(family, bytes_tokenizer, tmp_path / "model")
    path, report = export(tmp_path / "model", tmp_path / "m.gguf", ExportConfig(type="f32"))
    assert report.file_matches and max(report.max_abs_error.values()) == 0
    reader, tensors = read(path)
    state = model.state_dict()
    arch = {"mixtral": "llama", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe"}.get(family, family)
    assert field(reader, "general.architecture") == arch
    assert field(reader, f"{arch}.block_count") == 2 and field(reader, f"{arch}.embedding_length") == 64
    assert field(reader, f"{arch}.attention.head_count") == 4 and field(reader, f"{arch}.attention.head_count_kv") == 2
    np.testing.assert_array_equal(value(tensors["token_embd.weight"]), state["model.embed_tokens.weight"].numpy())
    np.testing.assert_array_equal(value(tensors["output.weight"]), state["lm_head.weight"].numpy())  # untied
    np.testing.assert_array_equal(value(tensors["blk.1.ffn_norm.weight"]),
                                  state["model.layers.1.post_attention_layernorm.weight"].numpy())  # fmt: skip
    q = state["model.layers.0.self_attn.q_proj.weight"].numpy()
    if arch == "llama":  # rows of each 16-wide head from halves to adjacent pairs: 0, 8, 1, 9, ..., 7, 15
        order = np.concatenate([h * 16 + np.stack([np.arange(8), np.arange(8) + 8], 1).reshape(-1) for h in range(4)])
        q = q[order]
    np.testing.assert_array_equal(value(tensors["blk.0.attn_q.weight"]), q)
    if family in ("qwen2_moe", "qwen3_moe", "mixtral"):
        gate_up = state["model.layers.1.mlp.experts.gate_up_proj"].numpy()  # (experts, 2 ffn, hidden)
        half = gate_up.shape[1] // 2
        np.testing.assert_array_equal(value(tensors["blk.1.ffn_gate_exps.weight"]), gate_up[:, :half])
        np.testing.assert_array_equal(value(tensors["blk.1.ffn_up_exps.weight"]), gate_up[:, half:])
        np.testing.assert_array_equal(value(tensors["blk.1.ffn_down_exps.weight"]),
                                      state["model.layers.1.mlp.experts.down_proj"].numpy())  # fmt: skip
        assert field(reader, f"{arch}.expert_count") == 4 and field(reader, f"{arch}.expert_used_count") == 2
        assert tensors["blk.0.ffn_gate_inp.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    if family == "qwen2_moe":
        assert tuple(tensors["blk.0.ffn_gate_inp_shexp.weight"].shape) == (64,)
    expected = {f"blk.{i}.{n}" for i in range(2) for n in ("attn_norm.weight", "ffn_norm.weight", "attn_q.weight")}
    assert expected <= set(tensors)


def test_the_tokenizer_and_chat_template_are_carried(tokenizer, tmp_path):
    tiny_folder("llama", tokenizer, tmp_path / "model")
    path, _ = export(tmp_path / "model", tmp_path / "m.gguf", ExportConfig(type="f16"))
    reader, _ = read(path)
    tokens = field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == len(tokenizer) and tokens[:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert tokens[1000] == tokenizer.convert_ids_to_tokens(1000)
    assert field(reader, "tokenizer.ggml.model") == "gpt2" and field(reader, "tokenizer.ggml.pre") == "smollm"
    assert field(reader, "tokenizer.ggml.token_type")[:2] == [3, 3]  # control tokens
    assert field(reader, "tokenizer.ggml.merges")[0] == "Ġ t"
    assert field(reader, "tokenizer.ggml.eos_token_id") == tokenizer.eos_token_id
    assert field(reader, "tokenizer.chat_template") == tokenizer.chat_template


def test_q8_0_is_within_half_a_step_of_the_source_and_norms_stay_f32(bytes_tokenizer, tmp_path):
    model = tiny_folder("qwen2", bytes_tokenizer, tmp_path / "model")
    path, report = export(tmp_path / "model", tmp_path / "m.gguf", ExportConfig(type="q8_0"))
    _, tensors = read(path)
    up = tensors["blk.0.ffn_up.weight"]
    assert up.tensor_type == gguf.GGMLQuantizationType.Q8_0
    source = model.state_dict()["model.layers.0.mlp.up_proj.weight"].numpy()
    step = np.abs(source.reshape(-1, 32)).max(1, keepdims=True) / 127  # Q8_0: a scale per 32 values
    # half a step, and the scale's own rounding to f16 (relative 2^-11) times the largest code, 127
    bound = step / 2 + 127 * step * 2.0**-11
    assert (np.abs(value(up) - source).reshape(-1, 32) <= bound + 1e-7).all()
    assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert tensors["blk.0.attn_q.bias"].tensor_type == gguf.GGMLQuantizationType.F32
    worst = max(  # the report's figure: the largest over every layer's tensor of that kind
        float(
            np.abs(
                value(tensors[f"blk.{i}.ffn_up.weight"])
                - model.state_dict()[f"model.layers.{i}.mlp.up_proj.weight"].numpy()
            ).max()
        )
        for i in range(2)
    )
    assert report.max_abs_error["ffn_up.weight"] == pytest.approx(worst)


def test_what_llama_cpp_would_compute_otherwise_is_refused_and_nothing_is_left(bytes_tokenizer, tmp_path):
    tiny_folder("qwen2_moe", bytes_tokenizer, tmp_path / "moe", norm_topk_prob=True)
    with pytest.raises(ConfigError, match="renormalise"):
        export(tmp_path / "moe", tmp_path / "m.gguf")
    tiny_folder("llama", bytes_tokenizer, tmp_path / "scaled", rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                                          "rope_theta": 10000.0})  # fmt: skip
    with pytest.raises(ConfigError, match="rope scaling"):
        export(tmp_path / "scaled", tmp_path / "m.gguf")
    with pytest.raises(ConfigError, match=".gguf"):
        export(tmp_path / "moe", tmp_path / "m.bin")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["moe", "scaled"]


def test_the_command_writes_one_file_and_says_one_line_on_bad_input(bytes_tokenizer, tmp_path):
    tiny_folder("qwen3", bytes_tokenizer, tmp_path / "model")
    proc = subprocess.run([sys.executable, "-m", "upcycle.cli", "export", str(tmp_path / "model"),
                           str(tmp_path / "m.gguf"), "--type", "q8_0", "--no-progress"],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "saved" in proc.stdout and "read back byte for byte" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "upcycle.cli", "export", str(tmp_path / "model"),
                           str(tmp_path / "m.gguf"), "--type", "q8_0"], capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"upcycle: error: {tmp_path / 'm.gguf'} exists: pass --overwrite to replace it"
    ]


def test_a_bank_sparse_model_is_written_as_its_dense_twin(bytes_tokenizer, tmp_path):
    from upcycle import sparsify

    dense = hub.tiny("llama", vocab=len(bytes_tokenizer), hidden=64, layers=2, ffn=128)
    sparse, _ = sparsify(dense, None, bank=32, keep=8, rank=4, predictor="lowrank", warmup_steps=0, convert_steps=0)
    hub.save(sparse, bytes_tokenizer, tmp_path / "sparse")
    path, report = export(tmp_path / "sparse", tmp_path / "m.gguf", ExportConfig(type="f32"))
    assert report.densified and report.file_matches
    _, tensors = read(path)
    assert not any("predictor" in name for name in tensors)
    np.testing.assert_array_equal(value(tensors["blk.0.ffn_gate.weight"]),
                                  dense.state_dict()["model.layers.0.mlp.gate_proj.weight"].numpy())  # fmt: skip


# ---- llama.cpp itself -------------------------------------------------------------------------------------
try:
    import llama_cpp
except ImportError:  # the file checks above run everywhere; these need llama.cpp itself
    llama_cpp = None
needs_llama_cpp = pytest.mark.skipif(llama_cpp is None, reason="llama-cpp-python is not installed here")


@needs_llama_cpp
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "mixtral"])
def test_llama_cpp_computes_the_model_it_was_exported_from(family, tokenizer, tmp_path):
    model = tiny_folder(family, tokenizer, tmp_path / "model")
    path, report = export(tmp_path / "model", tmp_path / "m.gguf", ExportConfig(type="f32"))
    assert report.llamacpp["max_abs_dlogit"] <= 1e-3 and report.llamacpp["top1"] == 1.0, report.llamacpp
    ids = [5, 900, 77, 4242, 13, 31000, 2, 17]
    llm = llama_cpp.Llama(str(path), n_ctx=16, logits_all=True, type_k=0, type_v=0, verbose=False)  # f32 cache
    llm.eval(ids)
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(np.asarray(llm.scores[: len(ids)]) - ours).max() <= 1e-3


@needs_llama_cpp
@pytest.mark.parametrize("verb", ["prune", "slim", "grow"])
def test_a_pruned_a_slimmed_and_a_grown_output_round_trip_through_llama_cpp(verb, tokenizer, text_folder, tmp_path):
    import upcycle

    model = hub.tiny("llama", vocab=len(tokenizer), hidden=64, layers=2, ffn=128)
    text = dict(calibration=str(text_folder), calibration_tokens=256, seq_len=64)
    if verb == "prune":
        config = upcycle.PruneConfig(spec=upcycle.PruneSpec(method="wanda", sparsity=0.5), **text)
        model, _ = upcycle.prune(model, tokenizer, config, progress=False)
    elif verb == "slim":
        stage = upcycle.SlimStage(cuts=[upcycle.SlimStep(op="ffn_width", width=96)])
        model, _ = upcycle.slim(model, tokenizer, upcycle.SlimConfig(stages=[stage], **text), progress=False)
    else:  # dense -> MoE: a Mixtral whose experts differ (drop mode), so routing matters to the logits
        step = upcycle.GrowStep(op="moe", family="mixtral", experts=4, top_k=2, mode="drop")
        checks = upcycle.GrowChecks(max_loss_change=100.0, min_logit_cosine=-1.0, max_router_kl=100.0)
        model, _ = upcycle.grow(model, tokenizer, upcycle.GrowConfig(steps=[step], checks=checks, **text),
                                progress=False)  # fmt: skip
    hub.save(model, tokenizer, tmp_path / verb)
    _, report = export(tmp_path / verb, tmp_path / f"{verb}.gguf", ExportConfig(type="f32"))
    assert report.llamacpp["max_abs_dlogit"] <= 1e-3 and report.llamacpp["top1"] == 1.0, report.llamacpp
    if verb == "grow":
        assert report.arch == "llama" and type(model).__name__ == "MixtralForCausalLM"


def test_a_4_bit_type_without_llama_cpp_is_one_line_before_anything_is_read(bytes_tokenizer, tmp_path, monkeypatch):
    tiny_folder("llama", bytes_tokenizer, tmp_path / "model")
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as where it is not installed: import fails
    with pytest.raises(ConfigError, match="llama.cpp's own quantizer, and llama-cpp-python is not installed"):
        export(tmp_path / "model", tmp_path / "m.gguf", ExportConfig(type="q4_0"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


@needs_llama_cpp
def test_q4_types_are_llama_cpps_own_and_load(tokenizer, tmp_path):
    model = tiny_folder("qwen2", tokenizer, tmp_path / "model")
    path, report = export(tmp_path / "model", tmp_path / "m.gguf", ExportConfig(type="q4_0"))
    assert report.quantized_by == "llama.cpp" and report.file_matches
    _, tensors = read(path)
    assert tensors["blk.0.ffn_up.weight"].tensor_type == gguf.GGMLQuantizationType.Q4_0
    # 4-bit moves the logits; the model is still the one exported: most top-1 choices agree
    assert report.llamacpp["top1"] >= 0.5, report.llamacpp
    assert model.config.vocab_size == len(read(path)[0].fields["tokenizer.ggml.tokens"].data)
