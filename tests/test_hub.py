import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import logits, tokens_for
from upcycle import hub, hubcache
from upcycle.errors import (
    ConfigError,
    HubUnreachable,
    ModelNotFound,
    NotACausalLM,
    UnsafeWeights,
    UnsupportedArchitecture,
)

SRC = Path(__file__).resolve().parents[1] / "src" / "upcycle"


def test_tiny_builtin_comes_with_a_byte_tokenizer():
    model, tokenizer = hub.load("tiny-qwen3")
    ids = tokenizer("héllo", add_special_tokens=False)["input_ids"]
    assert len(ids) == 6 and max(ids) < model.config.vocab_size  # é is two bytes
    assert tokenizer.decode(ids) == "héllo"


@pytest.mark.parametrize("family", ["llama", "qwen2_moe"])
def test_save_then_load_folder_gives_identical_logits(tmp_path, family):
    model, tokenizer = hub.load(f"tiny-{family}")
    out = hub.save(model, tokenizer, tmp_path / "m")
    assert (out / "model.safetensors").exists() and (out / "config.json").exists()
    reloaded, tok2 = hub.load(out)
    ids = tokens_for(model)
    assert torch.equal(logits(model, ids), logits(reloaded, ids))
    assert tok2("abc")["input_ids"] == tokenizer("abc")["input_ids"]


def test_save_refuses_a_non_empty_folder_and_leaves_it_alone(tmp_path):
    model, tokenizer = hub.load("tiny-llama")
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty"):
        hub.save(model, tokenizer, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def _one_line(error) -> str:
    message = str(error.value)
    assert message and "\n" not in message
    return message


def test_missing_path(tmp_path):
    with pytest.raises(ModelNotFound) as err:
        hub.load(tmp_path / "nothing-here")
    assert "built-in" in _one_line(err)


def test_unknown_builtin():
    with pytest.raises(ModelNotFound) as err:
        hub.load("tiny-gpt9")
    assert "smollm2-135m" in _one_line(err)


def test_folder_without_config(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(NotACausalLM) as err:
        hub.load(tmp_path)
    assert "config.json" in _one_line(err)


def test_folder_with_an_encoder_model_is_not_a_causal_lm(tmp_path):
    from transformers import BertConfig, ViTConfig

    bert = BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=64)
    bert.architectures = ["BertForMaskedLM"]
    bert.save_pretrained(tmp_path / "bert")
    ViTConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2).save_pretrained(tmp_path / "vit")
    with pytest.raises(NotACausalLM) as err:
        hub.load(tmp_path / "bert")
    assert "BertForMaskedLM" in _one_line(err)
    with pytest.raises(NotACausalLM) as err:
        hub.load(tmp_path / "vit")
    assert "vit" in _one_line(err)


def test_unsupported_causal_lm_is_refused_before_reading_weights(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedArchitecture) as err:
        hub.load(tmp_path)
    assert "gpt2" in _one_line(err) and "llama" in str(err.value)


def test_pickle_only_weights_are_refused(tmp_path):
    model, _ = hub.load("tiny-llama")
    model.config.save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not unpickled, never")
    with pytest.raises(UnsafeWeights) as err:
        hub.load(tmp_path)
    assert "safetensors" in _one_line(err)


def test_remote_code_is_not_run_unless_asked(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps(
            {"model_type": "evil", "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.Evil"}}
        )
    )
    (tmp_path / "evil.py").write_text(f"open({str(tmp_path / 'ran')!r}, 'w').write('x')\n")
    with pytest.raises(NotACausalLM):
        hub.load(tmp_path)
    assert not (tmp_path / "ran").exists()


def test_offline_hub_id_fails_at_once_with_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    started = time.perf_counter()
    with pytest.raises(HubUnreachable) as err:
        hub.load("some-org/some-model")
    assert time.perf_counter() - started < 60  # "at once": no network retries (minutes); generous for a loaded machine
    message = _one_line(err)
    assert "unreachable" in message and "smollm2-135m" in message


def test_no_pickle_loading_anywhere_in_the_package():
    """Security: torch.load only with weights_only=True; no pickle module; remote code off by default."""
    for path in SRC.rglob("*.py"):
        text = path.read_text()
        assert not re.search(r"^\s*(import pickle|from pickle|import dill)", text, re.M), path
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, (path, call)
        assert "trust_remote_code=True" not in text, path


def test_an_unreachable_hub_is_one_line_from_the_command_without_retries(tmp_path):
    # the network is down (a refused port stands in for it) and nothing is cached: the command's whole
    # stderr is its one line, with none of the HTTP client's retry messages before it
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env |= {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run(
        [sys.executable, "-m", "upcycle.cli", "inspect", "some-org/some-model"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "upcycle: error: 'some-org/some-model' is not a local path and the Hugging Face hub is unreachable: "
        "pass a local model folder, a .gguf file, or a built-in (smollm2-135m, smollm2-135m-qwen2)"
    ]


def test_a_cached_hub_id_loads_from_the_cache_without_the_network(monkeypatch, tmp_path):
    # a snapshot laid out as huggingface_hub caches it: models--org--name/snapshots/<rev>/, refs/main
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hubcache, "hub_reachable", lambda: pytest.fail("the network was asked"))
    repo = tmp_path / "hub" / "models--some-org--tiny"
    snapshot = repo / "snapshots" / "abc123"
    hub.save(hub.tiny("llama"), hub.byte_tokenizer(), snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    model, _ = hub.load("some-org/tiny")
    reference = hub.tiny("llama")
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.equal(model(ids).logits, reference(ids).logits)


def test_an_unreachable_hub_id_is_answered_before_torch_is_imported(tmp_path):
    # the one line comes from the command line's own check, before the heavy imports (seconds on a laptop)
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env |= {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf")}
    code = "import sys; from upcycle.cli import main; rc = main(['export', 'org/model', 'x.gguf']); print(rc, 'torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.stdout.split() == ["2", "False"]
    assert proc.stderr.strip().startswith("upcycle: error: 'org/model' is not a local path")
    # a local folder of that shape is not a hub id: the verb's own loading runs (and says what it lacks)
    (tmp_path / "org" / "model").mkdir(parents=True)
    code = "import sys; from upcycle.cli import main; sys.exit(main(['inspect', 'org/model']))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                          cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 2 and "unreachable" not in proc.stderr
