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


def test_generate_at_int4_decodes_with_gptq_codes_from_the_calibration_tokens():
    """At int4 the dense model decodes greedily with the weights GPTQ chose on the calibration tokens:
    the same tokens as Hugging Face's generate on a copy converted with those blocks by hand."""
    from upcycle.infer.calibrate import calibration_blocks
    from upcycle.infer.precision import to_precision

    config = GenerateConfig(prompt="hello there", new_tokens=6, precision="int4", compile=False, repeats=1)
    config.int4_calibration_tokens = 512
    results = run("tiny-llama", config)
    model, tokenizer = hub.load("tiny-llama")
    blocks = calibration_blocks(tokenizer, 512)
    assert blocks.shape == (2, 256)
    model = to_precision(model, "int4", blocks).eval()
    ids = tokenizer("hello there", return_tensors="pt").input_ids
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)[0, ids.shape[1] :].tolist()
    assert results["dense"]["tokens"][: len(want)] == want
