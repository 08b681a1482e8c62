"""The `upcycle` command: a thin shell over the Python API. Each subcommand calls one function.

Options may also come from a YAML file (`--config run.yaml`) whose keys are the option names
(dashes or underscores); options given on the command line win. A user error prints one line
and exits with code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import yaml

from upcycle.errors import ConfigError, UpcycleError, check
from upcycle.yamlfile import read_mapping


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 — like every other user error
        raise ConfigError(f"{message} (see `{self.prog} --help`)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="upcycle", description="Turn the checkpoint you have into the model you need.")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def command(name, help):
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument("--config", type=Path, help="YAML file of options (keys = option names)")
        return p

    p = command("inspect", "family, sizes, parameter counts and a per-layer FFN/MoE table")
    p.add_argument("model", nargs="?", help="built-in name, HF folder, .gguf file or hub id")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--trust-remote-code", action="store_true")

    p = command("eval", "perplexity (and bits per token) on a corpus split")
    p.add_argument("model", nargs="?")
    p.add_argument("--data", default="shakespeare", help="shakespeare, pystdlib, or a .txt/.jsonl file or folder")
    p.add_argument("--split", default="validation", choices=["train", "validation"])
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--max-blocks", type=int, default=32, help="blocks to score; 0 = the whole split")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--json", action="store_true")
    p.add_argument("--trust-remote-code", action="store_true")

    p = command("convert", "save any loadable model as a plain Hugging Face folder (safetensors)")
    p.add_argument("model", nargs="?")
    p.add_argument("out", nargs="?")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--trust-remote-code", action="store_true")

    p = command("train", "continued training from a YAML run config (see upcycle.train.TrainConfig)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a top-level config key (value parsed as YAML), e.g. --set seq_len=128")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in the run's out folder")

    p = command("sparsify", "make the FFNs predictor-gated bank-sparse (keep K of every BANK channels)")
    p.add_argument("model", nargs="?")
    p.add_argument("out", nargs="?")
    p.add_argument("--bank", type=int, default=64, help="channels per bank (must divide the FFN width, or --pad)")
    p.add_argument("--keep", type=int, default=16, help="channels kept in every bank per token")
    p.add_argument("--rank", type=int, default=64, help="rank of the low-rank predictor")
    p.add_argument("--gate", default="hard", choices=["hard", "sigmoid", "softmax"])
    p.add_argument("--init", default="svd", choices=["svd", "random"], help="predictor initialisation")
    p.add_argument("--warmup-steps", type=int, default=200, help="predictor fitting steps per layer (0: none)")
    p.add_argument("--calibration", default="shakespeare+pystdlib", help="text for the warm-up ('a+b' mixes)")
    p.add_argument("--calibration-tokens", type=int, default=32768)
    p.add_argument("--layers", default=None, help="comma-separated layer indices (default: all)")
    p.add_argument("--permute", action="store_true", help="co-activation clustering of channels before banking")
    p.add_argument("--pad", action="store_true", help="pad the FFN width with zero channels to a multiple of BANK")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--trust-remote-code", action="store_true")

    p = command("densify", "export a bank-sparse model as its stock dense family (predictors dropped)")
    p.add_argument("model", nargs="?")
    p.add_argument("out", nargs="?")
    p.add_argument("--overwrite", action="store_true")

    p = command("bench", "how much faster the bank-sparse FFN runs here: FFN layer dense vs sparse, greedy decoding")
    p.add_argument("model", nargs="?", help="a bank-sparse model, or a dense one (sparsified on the fly to time it)")
    p.add_argument("--out", default=None, help="write bench.json and bench.md here")
    p.add_argument("--bank", type=int, default=None, help="for a dense MODEL (default 64)")
    p.add_argument("--keep", type=int, default=None, help="for a dense MODEL (default 16)")
    p.add_argument("--rank", type=int, default=None, help="for a dense MODEL (default 64)")
    p.add_argument("--batches", default="1,4,16", help="comma-separated batch sizes of the FFN microbenchmark")
    p.add_argument("--shapes", default="model,qwen7b", help="FFN shapes: the model's own and/or Qwen2.5-7B's")
    p.add_argument("--new-tokens", type=int, default=128, help="greedy decoding length")
    p.add_argument("--repeats", type=int, default=5, help="alternating measurements per figure (median)")
    p.add_argument("--no-decode", action="store_true", help="only the FFN microbenchmark")
    p.add_argument("--compile", action="store_true",
                   help="decode both models under torch.compile (static cache; the first run compiles, ~1 min)")

    p = command("repair", "find the layer behind a long-context failure of a bank-sparse model and retrain it alone")
    p.add_argument("model", nargs="?", help="a bank-sparse model folder")
    p.add_argument("--reference", required=False, help="its dense reference (built-in name or folder)")
    p.add_argument("--out", default=None, help="write the repaired model, repair.json/.md and the heat map here")
    p.add_argument("--layer", default="auto", help="auto (the localisation's first) or a layer index")
    p.add_argument("--lengths", default="512,1024,2048,4096", help="CWE context lengths in tokens")
    p.add_argument("--samples", type=int, default=4, help="CWE prompts per length")
    p.add_argument("--steps", type=int, default=300, help="repair training steps (2048 of the layer's rows each)")
    p.add_argument("--seq-len", type=int, default=1024, help="length of the sequences the layer's rows come from")
    p.add_argument("--lr", type=float, default=1e-3, help="predictor learning rate (the FFN's: a tenth of it)")
    p.add_argument("--predictor-only", action="store_true", help="retrain only the layer's predictor, not its FFN")
    p.add_argument("--end-to-end", action="store_true",
                   help="LM + KD on the logits through the whole model instead of layer-local KD (slow on a CPU)")
    p.add_argument("--no-control", action="store_true", help="skip repairing a random layer for comparison")
    p.add_argument("--overwrite", action="store_true")

    p = command("demo", "fetch the embedded model, inspect it, evaluate it, write runs/demo/report.md")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--max-blocks", type=int, default=32)
    p.add_argument("--sparse-tokens", type=int, default=28672, help="training tokens of the sparsify part (0: skip it)")
    return parser


_REQUIRED = {"inspect": ["model"], "eval": ["model"], "convert": ["model", "out"], "train": [], "demo": [],
             "sparsify": ["model", "out"], "densify": ["model", "out"], "bench": ["model"],
             "repair": ["model", "reference"]}


def parse(argv: list[str]) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "train":  # the run config is a typed schema of its own, read by the trainer
        if args.config is None:
            raise ConfigError("train: --config RUN.yaml is required")
        return args
    if getattr(args, "config", None) is not None:
        args = _with_config_file(parser, argv, args)
    missing = [name for name in _REQUIRED[args.command] if getattr(args, name) is None]
    if missing:
        raise ConfigError(f"{args.command}: missing {', '.join(missing).upper()} (on the command line or in --config)")
    return args


def _with_config_file(parser, argv, args) -> argparse.Namespace:
    path = args.config
    values = read_mapping(path, "--config")
    subparser = parser._subparsers._group_actions[0].choices[args.command]
    known = {a.dest for a in subparser._actions} - {"help", "config"}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"--config {path}: unknown option {unknown[0]!r} for `{args.command}`; "
                          f"known: {', '.join(sorted(known))}")
    subparser.set_defaults(**values)  # command-line values still win over these
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = parse(argv)
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        return COMMANDS[args.command](args) or 0
    except UpcycleError as e:
        print(f"upcycle: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("upcycle: interrupted", file=sys.stderr)
        return 130


def _quiet_transformers():
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()


def cmd_inspect(args) -> int:
    from upcycle.hub import load
    from upcycle.summary import format_summary, summarize

    _quiet_transformers()
    model, _ = load(args.model, trust_remote_code=args.trust_remote_code)
    summary = summarize(model)
    print(json.dumps(summary.as_dict(), indent=2) if args.json else format_summary(summary))
    return 0


def cmd_eval(args) -> int:
    from upcycle.evaluate import EvalConfig, evaluate
    from upcycle.hub import load

    _quiet_transformers()
    config = EvalConfig(data=args.data, split=args.split, seq_len=args.seq_len,
                        max_blocks=args.max_blocks or None, batch_size=args.batch_size)
    model, tokenizer = load(args.model, trust_remote_code=args.trust_remote_code)
    result = evaluate(model, tokenizer, config)
    if args.json:
        print(json.dumps({"model": args.model, "data": args.data, "split": args.split, **result.as_dict()}, indent=2))
    else:
        print(f"{args.model} on {args.data} {args.split}: ppl {result.ppl:.3f}, bits/token "
              f"{result.bits_per_token:.3f}, nll {result.nll:.4f} ({result.tokens} tokens)")
    return 0


def cmd_convert(args) -> int:
    import torch

    from upcycle.eval import compare
    from upcycle.hub import load, save

    _quiet_transformers()
    dtype = getattr(torch, args.dtype)
    out = _fresh_out(args.out, args.overwrite)
    model, tokenizer = load(args.model, trust_remote_code=args.trust_remote_code)
    save(model.to(dtype), tokenizer, out, overwrite=args.overwrite)
    # a conversion states whether it preserved the function: reload what was written and compare
    reloaded, _ = load(out, dtype=dtype)
    probe = torch.randint(0, model.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    check = compare(model, reloaded, probe)
    print(f"saved {out} ({args.dtype}); reloaded: {check.summary()}")
    return 0


def cmd_train(args) -> int:
    from upcycle.train import Trainer, TrainConfig

    _quiet_transformers()
    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        overrides[key.strip().replace("-", "_")] = yaml.safe_load(value)
    config = TrainConfig.from_yaml(args.config, overrides)
    summary = Trainer(config).fit(resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary))
    return 0


def _int_list(value, option: str, expected: str) -> tuple[int, ...]:
    """A comma-separated list of integers, or a one-line error naming the option."""
    try:
        return tuple(int(v) for v in str(value).split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"{option} {value!r}: expected {expected}") from None


def _fresh_out(path: str, overwrite: bool) -> Path:
    out = Path(path)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"OUT {str(out)!r} exists and is not empty: choose a new folder or pass --overwrite")
    return out


def cmd_sparsify(args) -> int:
    from upcycle.hub import load
    from upcycle.ops import SparsifyConfig
    from upcycle.ops.sparsify_run import sparsify_to_folder

    _quiet_transformers()
    layers = None if args.layers is None else list(
        _int_list(args.layers, "--layers", "comma-separated layer indices, e.g. 0,1,2"))
    config = SparsifyConfig(bank=args.bank, keep=args.keep, rank=args.rank, gate=args.gate, init=args.init,
                            warmup_steps=args.warmup_steps, calibration=args.calibration,
                            calibration_tokens=args.calibration_tokens, layers=layers, permute=args.permute,
                            pad=args.pad, seed=args.seed, progress=True)
    out = _fresh_out(args.out, args.overwrite)
    model, tokenizer = load(args.model, trust_remote_code=args.trust_remote_code)
    print(sparsify_to_folder(model, tokenizer, config, out, overwrite=args.overwrite, source=args.model))
    return 0


def cmd_densify(args) -> int:
    import torch

    from upcycle.eval import compare
    from upcycle.hub import load, save
    from upcycle.ops import densify

    _quiet_transformers()
    out = _fresh_out(args.out, args.overwrite)
    model, tokenizer = load(args.model)
    dense = densify(model)
    save(dense, tokenizer, out, overwrite=args.overwrite)
    probe = torch.randint(0, model.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    print(f"saved {out} ({dense.config.model_type}, every channel computed); dense vs sparse on random tokens: "
          f"{compare(model, dense, probe).summary()}")
    return 0


def cmd_bench(args) -> int:
    from upcycle.bench import run
    from upcycle.modules import BankSparsity

    _quiet_transformers()
    batches = _int_list(args.batches, "--batches", "comma-separated sizes, e.g. 1,4,16")
    check(bool(batches) and min(batches) >= 1, "batches", args.batches, "positive integers")
    check(args.new_tokens >= 1, "new_tokens", args.new_tokens, ">= 1")
    check(args.repeats >= 1, "repeats", args.repeats, ">= 1")
    given = {k: v for k, v in (("bank", args.bank), ("keep", args.keep), ("rank", args.rank)) if v is not None}
    sparsity = BankSparsity(**given) if given else None
    shapes = tuple(v.strip() for v in args.shapes.split(",") if v.strip())
    report = run(args.model, args.out, sparsity=sparsity, batches=batches, shapes=shapes, new_tokens=args.new_tokens,
                 repeats=args.repeats, decode=not args.no_decode, compiled=args.compile)
    print(report.table())
    if args.out:
        print(f"wrote {Path(args.out) / 'bench.json'} and bench.md")
    return 0


def cmd_repair(args) -> int:
    from upcycle.hub import load
    from upcycle.repair import sparse_ffns
    from upcycle.repair_run import RepairOptions, report_markdown, run_repair

    _quiet_transformers()
    lengths = _int_list(args.lengths, "--lengths", "comma-separated token counts, e.g. 512,1024")
    check(bool(lengths) and min(lengths) >= 64, "lengths", args.lengths, "token counts >= 64")
    check(args.layer == "auto" or args.layer.isdigit(), "layer", args.layer, "auto or a layer index")
    for name in ("samples", "steps"):
        check(getattr(args, name) >= 1, name, getattr(args, name), ">= 1")
    check(args.seq_len >= 16, "seq_len", args.seq_len, ">= 16")
    out = _fresh_out(args.out, args.overwrite) if args.out else None
    model, tokenizer = load(args.model)
    layers = sparse_ffns(model)  # one-line error for a model with no bank-sparse layer
    if args.layer != "auto" and int(args.layer) not in layers:
        raise ConfigError(f"--layer {args.layer}: not a bank-sparse layer (those are {sorted(layers)})")
    if tokenizer is None:
        raise ConfigError(f"{args.model}: no tokenizer in the folder; CWE prompts need one")
    reference, _ = load(args.reference)
    options = RepairOptions(layer=args.layer if args.layer == "auto" else int(args.layer), lengths=lengths,
                            samples=args.samples, steps=args.steps, seq_len=args.seq_len, lr=args.lr,
                            train_ffn=not args.predictor_only, control=not args.no_control,
                            objective="end_to_end" if args.end_to_end else "local")
    result = run_repair(model, tokenizer, reference, out, options)
    print(report_markdown(result))
    if out is not None:
        print(f"wrote {out}/model (layer {result['chosen_layer']} repaired), repair.json, repair.md, localisation.png")
    return 0


def cmd_demo(args) -> int:
    from upcycle.demo import run

    _quiet_transformers()
    run(args.out, model_name=args.model, max_blocks=args.max_blocks, sparse_tokens=args.sparse_tokens)
    return 0


COMMANDS = {"inspect": cmd_inspect, "eval": cmd_eval, "convert": cmd_convert, "train": cmd_train, "demo": cmd_demo,
            "sparsify": cmd_sparsify, "densify": cmd_densify, "bench": cmd_bench,
            "repair": cmd_repair}


if __name__ == "__main__":
    sys.exit(main())
