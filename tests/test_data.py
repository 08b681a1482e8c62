import json

import numpy as np
import pytest

from upcycle import data, hub
from upcycle.errors import ConfigError, DataError


def test_split_is_deterministic_disjoint_and_complete(text_folder):
    docs = data.documents(str(text_folder))
    assert len(docs) == 10
    train, val = data.split_documents(docs, 0.2, seed=0)
    again_train, again_val = data.split_documents(list(reversed(docs)), 0.2, seed=0)
    names = lambda ds: sorted(d.name for d in ds)  # noqa: E731
    assert names(train) == names(again_train) and names(val) == names(again_val)
    assert not set(names(train)) & set(names(val))
    assert sorted(names(train) + names(val)) == names(docs)
    assert len(val) == 2
    other_seed = [names(data.split_documents(docs, 0.2, seed=s)[1]) for s in range(1, 6)]
    assert any(v != names(val) for v in other_seed)  # the seed matters


def test_split_needs_two_documents_and_a_fraction(text_folder):
    docs = data.documents(str(text_folder))
    with pytest.raises(DataError):
        data.split_documents(docs[:1])
    with pytest.raises(ConfigError, match="val_fraction"):
        data.split_documents(docs, 1.5)


def test_blocks_pack_documents_with_end_of_text(text_folder, tmp_cache):
    tokenizer = hub.byte_tokenizer()
    docs = data.documents(str(text_folder))
    train_docs, val_docs = data.split_documents(docs, 0.1)
    ids = data.tokens(str(text_folder), tokenizer, "validation")
    assert isinstance(ids, np.memmap)
    expected = tokenizer(val_docs[0].text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert ids.tolist() == expected
    x = data.blocks(str(text_folder), tokenizer, "train", 64)
    train_len = sum(len(d.text.encode()) + 1 for d in train_docs)  # byte tokenizer: one id per byte
    assert x.shape == (train_len // 64, 64)
    assert tokenizer.decode(x[0].tolist()) == train_docs[0].text[:64]
    assert data.blocks(str(text_folder), tokenizer, "train", 64, max_blocks=3).shape == (3, 64)


def test_token_cache_is_reused_and_keyed_by_tokenizer(text_folder, tmp_cache, monkeypatch):
    tokenizer = hub.byte_tokenizer()
    first = data.tokens(str(text_folder), tokenizer, "train").tolist()
    monkeypatch.setattr(data, "_tokenize_into", lambda *a: pytest.fail("tokenized twice"))
    assert data.tokens(str(text_folder), tokenizer, "train").tolist() == first
    assert len(list((tmp_cache / "tokens").iterdir())) == 1


def test_changed_source_is_tokenized_again(text_folder, tmp_cache):
    tokenizer = hub.byte_tokenizer()
    before = len(data.tokens(str(text_folder), tokenizer, "train")) + len(
        data.tokens(str(text_folder), tokenizer, "validation")
    )
    (text_folder / "doc_new.txt").write_text("a brand new document\n")
    after = len(data.tokens(str(text_folder), tokenizer, "train")) + len(
        data.tokens(str(text_folder), tokenizer, "validation")
    )
    assert after == before + len("a brand new document\n") + 1


def test_jsonl_documents_and_bad_lines(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text("\n".join(json.dumps({"text": f"row {i}"}) for i in range(3)) + "\n")
    assert [d.text for d in data.documents(str(good))] == ["row 0", "row 1", "row 2"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"body": "no text"}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:2"):
        data.documents(str(bad))


def test_missing_or_empty_sources(tmp_path):
    with pytest.raises(DataError, match="no text source"):
        data.documents(str(tmp_path / "absent"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no text"):
        data.documents(str(tmp_path / "empty"))


def test_too_few_tokens_for_one_block(text_folder, tmp_cache):
    with pytest.raises(DataError, match="fewer than one block"):
        data.blocks(str(text_folder), hub.byte_tokenizer(), "validation", 100_000)


def test_pystdlib_lists_the_standard_library_without_tests():
    docs = data.documents("pystdlib")
    names = {d.name for d in docs}
    assert "argparse.py" in names and "json/decoder.py" in names
    assert not any(n.startswith(("test/", "idlelib/idle_test/")) for n in names)
    assert len(docs) > 300
