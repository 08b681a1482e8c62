"""Training throughput of upcycle's Trainer against the Hugging Face Trainer on smollm2-135m.

Same model, data, batch, sequence length, optimizer (fused AdamW), clipping and threads; the
two alternate in one process (upcycle, HF, upcycle, HF, ...) and each reports the median interval
between consecutive optimizer steps after the first, so load noise on this shared machine hits
both alike. Result: benchmarks/results/trainer_throughput.json.

    python benchmarks/trainer_throughput.py [--rounds 3] [--steps 6] [--batch 4] [--seq-len 256]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from harness import save

from upcycle import data, hub
from upcycle.train import Callback, TrainConfig, Trainer


def upcycle_step_intervals(args, workdir: Path) -> list[float]:
    stamps = []

    class Clock(Callback):
        def on_step_end(self, trainer, record):
            stamps.append(time.perf_counter())

    model, tokenizer = hub.load("smollm2-135m")
    config = TrainConfig(
        model="smollm2-135m",
        data="shakespeare",
        out=str(workdir / "upcycle"),
        seq_len=args.seq_len,
        global_batch=args.batch,
        micro_batch=args.batch,
        lr=1e-4,
        warmup_steps=1,
        clip=1.0,
        ckpt_every=10_000,
        val_blocks=1,
        progress=False,
        stages=[{"name": "bench", "tokens": args.steps * args.batch * args.seq_len}],
    )
    Trainer(config, model=model, tokenizer=tokenizer, callbacks=[Clock()]).fit()
    return [b - a for a, b in zip(stamps, stamps[1:])]


def hf_step_intervals(args, workdir: Path) -> list[float]:
    from transformers import Trainer as HFTrainer
    from transformers import TrainerCallback, TrainingArguments

    stamps = []

    class Clock(TrainerCallback):
        def on_step_end(self, *_, **__):
            stamps.append(time.perf_counter())

    model, tokenizer = hub.load("smollm2-135m")
    blocks = data.blocks("shakespeare", tokenizer, "train", args.seq_len)
    order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(0))[: args.steps * args.batch]

    class Blocks(torch.utils.data.Dataset):
        def __len__(self):
            return len(order)

        def __getitem__(self, i):
            ids = blocks[order[i]]
            return {"input_ids": ids, "labels": ids}

    training_args = TrainingArguments(
        output_dir=str(workdir / "hf"),
        per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1,
        max_steps=args.steps,
        learning_rate=1e-4,
        warmup_steps=1,
        lr_scheduler_type="cosine",
        max_grad_norm=1.0,
        optim="adamw_torch_fused",
        weight_decay=0.0,
        adam_beta2=0.95,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        eval_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        seed=0,
    )
    HFTrainer(model=model, args=training_args, train_dataset=Blocks(), callbacks=[Clock()]).train()
    return [b - a for a, b in zip(stamps, stamps[1:])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    tokens_per_step = args.batch * args.seq_len
    intervals = {"upcycle": [], "hf_trainer": []}
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            row = {}
            for name, fn in (("upcycle", upcycle_step_intervals), ("hf_trainer", hf_step_intervals)):
                steps = fn(args, Path(tmp) / f"{name}-{r}")
                intervals[name] += steps
                row[name] = round(tokens_per_step / statistics.median(steps), 1)
                print(
                    f"round {r + 1}/{args.rounds} {name:10s} {row[name]:8.1f} tokens/s "
                    f"(median of {len(steps)} step intervals)",
                    flush=True,
                )
            rounds.append(row)
    tps = {k: round(tokens_per_step / statistics.median(v), 1) for k, v in intervals.items()}
    result = {
        "tokens_per_s": tps,
        "ratio": round(tps["upcycle"] / tps["hf_trainer"], 3),
        "rounds": rounds,
        "setup": {
            "model": "smollm2-135m",
            "data": "shakespeare train",
            "batch": args.batch,
            "seq_len": args.seq_len,
            "steps_per_run": args.steps,
            "threads": args.threads,
            "dtype": "float32",
            "optimizer": "AdamW, fused (both trainers' default)",
            "clip": 1.0,
            "torch": torch.__version__,
            "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        },
    }
    save("trainer_throughput", result)
    print(json.dumps({"tokens_per_s": tps, "ratio": result["ratio"]}))


if __name__ == "__main__":
    main()
