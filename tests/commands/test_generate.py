import torch

from upcycle import hub
from upcycle.commands.generate import GenerateConfig, run


def test_generate_runs_dense_and_sparse_side_by_side_and_the_dense_text_is_greedy(capsys):
    results = run(
        "tiny-llama", GenerateConfig(prompt="hello there", new_tokens=6, sparsify=True, compile=False, repeats=1)
    )
    assert set(results) == {"dense", "sparse"}
    assert all(len(r["tokens"]) == 6 and r["tok_s"] > 0 for r in results.values())
    model, tokenizer = hub.load("tiny-llama")  # an independent greedy run of the same dense model
    ids = tokenizer("hello there", return_tensors="pt").input_ids
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)[0, ids.shape[1] :].tolist()
    assert results["dense"]["tokens"][: len(want)] == want
    printed = capsys.readouterr().out
    assert "sparse ÷ dense" in printed and "tokens/s" in printed
