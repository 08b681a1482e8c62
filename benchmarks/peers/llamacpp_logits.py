"""llama.cpp's logits on given token ids and its greedy continuation of a prompt (run inside the llama.cpp
environment; no upcycle, no torch).

    python llamacpp_logits.py MODEL.gguf IN.json OUT.npz

IN.json: {"ids": [...], "prompt": [...], "new_tokens": N}. OUT.npz: `logits` (len(ids), vocab) float32, each
position's next-token logits; `greedy` the N token ids llama.cpp picks after the prompt (temperature 0,
end-of-sequence not honoured, so every run makes N).
"""

from __future__ import annotations

import json
import sys

import llama_cpp
import numpy as np


def main() -> None:
    path, request, out = sys.argv[1:4]
    spec = json.loads(open(request).read())
    ids, prompt, new = spec["ids"], spec["prompt"], spec["new_tokens"]
    n_ctx = max(len(ids), len(prompt) + new) + 8
    llm = llama_cpp.Llama(
        path,
        n_ctx=n_ctx,
        n_batch=n_ctx,
        n_ubatch=n_ctx,
        logits_all=True,
        verbose=False,
        type_k=llama_cpp.GGML_TYPE_F32,
        type_v=llama_cpp.GGML_TYPE_F32,
    )  # f32 cache: the file compared
    llm.eval(ids)
    logits = np.asarray(llm.scores[: len(ids)], dtype=np.float32).copy()
    llm.reset()
    greedy = []
    for token in llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
        greedy.append(int(token))
        if len(greedy) == new:
            break
    np.savez(out, logits=logits, greedy=np.asarray(greedy, dtype=np.int64))


if __name__ == "__main__":
    main()
