"""The one trainer: stages, loss terms, callbacks, checkpoints and exact resume, one process or many.

    trainer = Trainer(TrainConfig.from_yaml("run.yaml"))
    summary = trainer.fit()              # or fit(resume=True) after a crash

Every upcycle verb ends here: its own needs arrive as loss terms (losses.py), stage transforms
(TRANSFORMS) and callbacks (Callback), never as a trainer of its own.
"""

from __future__ import annotations

import copy
import inspect
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM

from upcycle import data, hub
from upcycle.errors import ConfigError, UpcycleError
from upcycle.eval import perplexity
from upcycle.train import checkpoint, distributed
from upcycle.train.config import TrainConfig
from upcycle.train.groups import configure_trainable
from upcycle.train.losses import LOSSES, LossInputs, forward_options
from upcycle.train.records import MetricsLog, plot_loss, write_report
from upcycle.train.registry import CALLBACKS, options_for, transform
from upcycle.train.schedules import lr_factor, weight_at


class TrainingDiverged(UpcycleError):
    """The loss stopped being a finite number; the last good checkpoint is kept."""

    keeps_output = True  # the run folder holds the checkpoints to resume from: never cleaned up


class Callback:
    """Hooks at step boundaries. `state` is the trainer: model, optimizer, config, progress."""

    def on_stage_start(self, trainer: "Trainer") -> None: ...

    def on_after_backward(self, trainer: "Trainer") -> None:
        """Gradients of this step are in the parameters' .grad, not yet clipped; the optimizer has not stepped."""

    def on_step_end(self, trainer: "Trainer", record: dict) -> None: ...

    def on_stage_end(self, trainer: "Trainer") -> None: ...


@dataclass
class Progress:
    """Where training stands; saved in every checkpoint."""

    stage_index: int = 0
    stage_step: int = 0  # optimizer steps done in the current stage
    step: int = 0  # optimizer steps done in the run
    samples: int = 0  # sequences consumed: the data position
    tokens: int = 0


class Trainer:
    def __init__(
        self, config: TrainConfig, *, model=None, tokenizer=None, teacher=None, callbacks: list[Callback] = ()
    ):
        self.config = config
        self.callbacks = list(callbacks)
        self.world = distributed.init_world()
        self.out = Path(config.out)
        torch.manual_seed(config.seed)
        if model is None:
            model, tokenizer = hub.load(config.model, trust_remote_code=config.trust_remote_code)
        self.model = model.to(self.world.device)
        self.tokenizer = tokenizer
        self.teacher = self._teacher(teacher)
        self.train_blocks = data.blocks(
            config.data, tokenizer, "train", config.seq_len, val_fraction=config.val_fraction, seed=config.seed
        )
        self.val_blocks = data.blocks(
            config.data,
            tokenizer,
            "validation",
            config.seq_len,
            max_blocks=config.val_blocks,
            val_fraction=config.val_fraction,
            seed=config.seed,
        )
        vocab = self.model.get_input_embeddings().weight.shape[0]
        if int(self.train_blocks.max()) >= vocab:
            raise ConfigError(
                f"data {config.data!r} has token ids up to {int(self.train_blocks.max())}, beyond "
                f"the model's vocabulary of {vocab}: tokenize with the model's own tokenizer"
            )
        if config.global_batch % (config.micro_batch * self.world.size):
            raise ConfigError(
                f"global_batch={config.global_batch} is not a multiple of micro_batch x processes "
                f"({config.micro_batch} x {self.world.size})"
            )
        for stage in config.stages:
            self.stage_steps(stage)  # refuse a stage too small for one step before any work
        self.progress = Progress()
        self.optimizer = None
        self.wrapped = None
        self._order: tuple[int, torch.Tensor] | None = None  # (epoch, permutation) of the current epoch
        self._applied: set[int] = set()
        # what the stage transforms report, by stage name, and what they carry from one stage to the next
        # (e.g. the slim transform's lineage): the run's, never a module's
        self.stage_reports: dict[str, object] = {}
        self.state: dict = {}

    # ---- set-up ----------------------------------------------------------------------------------
    def _teacher(self, teacher):
        if not any(t.name == "kd" for t in self.config.losses):
            return None
        if teacher is None:
            source = self.config.teacher
            teacher = copy.deepcopy(self.model) if source == "self" else hub.load(source)[0]
        teacher = teacher.to(self.world.device).eval().requires_grad_(False)
        t_vocab = teacher.get_output_embeddings().weight.shape[0]
        s_vocab = self.model.get_output_embeddings().weight.shape[0]
        if t_vocab != s_vocab:
            raise ConfigError(
                f"teacher vocabulary ({t_vocab}) differs from the student's ({s_vocab}): "
                "distillation needs the same tokenizer"
            )
        return teacher

    def stage_steps(self, stage) -> int:
        per_step = self.config.global_batch * self.config.seq_len
        if stage.tokens < per_step:
            raise ConfigError(
                f"stage {stage.name!r}: tokens={stage.tokens} is fewer than one optimizer step "
                f"(global_batch {self.config.global_batch} x seq_len {self.config.seq_len} = {per_step})"
            )
        return math.ceil(stage.tokens / per_step)

    def _apply_transform(self, index: int) -> None:
        stage = self.config.stages[index]
        if stage.transform is None or index in self._applied:
            return
        fn = transform(stage.transform)
        takes = inspect.signature(fn).parameters
        extra = {k: v for k, v in (("tokenizer", self.tokenizer), ("state", self.state)) if k in takes}
        result = fn(self.model, **options_for(stage.transform, stage.transform_options), **extra)
        if isinstance(result, tuple):  # (model, report): the report is the stage's result
            result, self.stage_reports[stage.name] = result
        self.model = result.to(self.world.device)
        self._applied.add(index)

    # ---- data ----------------------------------------------------------------------------------
    def _sample(self, index: int) -> torch.Tensor:
        """The index-th training sequence of the run: epochs of seeded permutations of the blocks,
        so the data position is one integer and resume continues with the very next sequence."""
        n = len(self.train_blocks)
        epoch = index // n
        if self._order is None or self._order[0] != epoch:
            gen = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
            self._order = (epoch, torch.randperm(n, generator=gen))
        return self.train_blocks[self._order[1][index % n]]

    def _micro_batches(self):
        """This process's share of the next global batch, as micro-batches."""
        cfg, world = self.config, self.world
        per_rank = cfg.global_batch // world.size
        first = self.progress.samples + world.rank * per_rank
        for start in range(0, per_rank, cfg.micro_batch):
            yield torch.stack([self._sample(first + start + j) for j in range(cfg.micro_batch)])

    # ---- one optimizer step ----------------------------------------------------------------------
    def _step(self, stage, steps: int, base_lr: float, callbacks: list[Callback]) -> dict:
        cfg = self.config
        factor = lr_factor(
            self.progress.stage_step,
            steps,
            stage.warmup_steps if stage.warmup_steps is not None else cfg.warmup_steps,
            cfg.schedule,
            cfg.min_lr_ratio,
        )
        for group in self.optimizer.param_groups:
            group["lr"] = base_lr * group["lr_mult"] * factor
        self.optimizer.zero_grad(set_to_none=True)
        micro = list(self._micro_batches())
        share = 1.0 / len(micro)
        total = torch.zeros((), device=self.world.device)
        terms = {t.name: torch.zeros((), device=self.world.device) for t in cfg.losses}
        autocast = torch.autocast(self.world.device.type, dtype=torch.bfloat16, enabled=cfg.bf16)
        extra = forward_options(t.name for t in cfg.losses)
        for i, ids in enumerate(micro):
            ids = ids.to(self.world.device)
            with distributed.no_sync(self.wrapped, i == len(micro) - 1), autocast:
                # use_cache=False: a KV cache is for generation; in training it only costs copies
                output = self.wrapped(input_ids=ids, use_cache=False, **extra)
                logits = output.logits
                teacher_logits = None
                if self.teacher is not None:
                    with torch.no_grad():
                        teacher_logits = self.teacher(input_ids=ids, use_cache=False).logits
                hidden = getattr(output, "hidden_states", None)
                inputs = LossInputs(
                    logits,
                    ids,
                    teacher_logits,
                    distributed.unwrap(self.wrapped),
                    getattr(output, "router_logits", None),
                    hidden[-1] if hidden else None,
                )
                loss = torch.zeros((), device=self.world.device)
                for term in cfg.losses:
                    value = LOSSES[term.name](inputs, **term.options)
                    terms[term.name] += value.detach() * share
                    loss = loss + weight_at(term.weight, self.progress.stage_step, steps) * value
            (loss * share).backward()
            total += loss.detach() * share
        total = self.world.all_mean(total)
        if not torch.isfinite(total):
            last = checkpoint.latest(self.out)
            raise TrainingDiverged(
                f"loss became {total.item()} at step {self.progress.step + 1} (stage {stage.name!r}); "
                f"stopped; last good checkpoint: {last or 'none yet'}"
            )
        for cb in callbacks:  # before clipping: a callback that edits gradients does so before the norm is taken
            cb.on_after_backward(self)
        grad_norm = None
        if cfg.clip is not None:
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.clip))
        self.optimizer.step()
        self.progress.stage_step += 1
        self.progress.step += 1
        self.progress.samples += cfg.global_batch
        self.progress.tokens += cfg.global_batch * cfg.seq_len
        record = {
            "step": self.progress.step,
            "stage": stage.name,
            "tokens": self.progress.tokens,
            "loss": total.item(),
            "lr": base_lr * factor,
        }
        if len(terms) > 1:
            record.update({f"loss_{k}": self.world.all_mean(v).item() for k, v in terms.items()})
        if grad_norm is not None:
            record["grad_norm"] = grad_norm
        return record

    # ---- the run -------------------------------------------------------------------------------
    def fit(self, resume: bool = False) -> dict:
        cfg, world = self.config, self.world
        self.out.mkdir(parents=True, exist_ok=True)
        state = self._resume() if resume else None
        log = MetricsLog(self.out / "metrics.jsonl", resume_step=self.progress.step if resume else None)
        if world.is_main:
            (self.out / "config.yaml").write_text(cfg.to_yaml())
        started, stage_rows = time.perf_counter(), []
        tokens_at_start = self.progress.tokens
        for index, stage in enumerate(cfg.stages):
            if index < self.progress.stage_index:
                continue
            if index > self.progress.stage_index:
                self.progress.stage_index, self.progress.stage_step = index, 0
            self._apply_transform(index)
            steps = self.stage_steps(stage)
            base_lr = stage.lr if stage.lr is not None else cfg.lr
            self._prepare_stage(stage, base_lr, state)
            self.wrapped.train()  # loaded models come in eval mode (dropout off)
            state = None
            callbacks = self.callbacks + [CALLBACKS[c["name"]](**c.get("options", {})) for c in stage.callbacks]
            for cb in callbacks:
                cb.on_stage_start(self)
            bar = tqdm(
                total=steps,
                initial=self.progress.stage_step,
                desc=f"{stage.name}",
                unit="step",
                disable=not (cfg.progress and world.is_main),
                dynamic_ncols=True,
            )
            record = {}
            while self.progress.stage_step < steps:
                t0 = time.perf_counter()
                record = self._step(stage, steps, base_lr, callbacks)
                record["tok_s"] = round(cfg.global_batch * cfg.seq_len / (time.perf_counter() - t0), 1)
                last = self.progress.stage_step == steps
                if cfg.val_every and self.progress.step % cfg.val_every == 0 and not last:
                    val = self._validate(stage)  # every rank takes part (FSDP needs all in the forward)
                    if world.is_main:
                        log.write(val)
                if world.is_main and (self.progress.step % cfg.log_every == 0 or last):
                    log.write(record)
                for cb in callbacks:
                    cb.on_step_end(self, record)
                bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tok_s']:.0f}")
                bar.update(1)
                if self.progress.step % cfg.ckpt_every == 0 and not last:
                    self._checkpoint()
            bar.close()
            val = self._validate(stage)
            if world.is_main:
                log.write(val)
            for cb in callbacks:
                cb.on_stage_end(self)
            self._checkpoint()
            stage_rows.append(
                {
                    "name": stage.name,
                    "steps": steps,
                    "tokens": steps * cfg.global_batch * cfg.seq_len,
                    "train_loss": record.get("loss"),
                    "val_loss": val["val_loss"],
                    "val_ppl": val["val_ppl"],
                }
            )
        return self._finish(log, stage_rows, started, tokens_at_start)

    def _prepare_stage(self, stage, base_lr: float, state: dict | None) -> None:
        cfg = self.config
        sharded = cfg.distributed == "fsdp" and self.world.size > 1
        if not sharded:  # DDP registers its hooks on the parameters that are trainable when it wraps
            groups = configure_trainable(self.model, cfg.groups, stage.train)
            self.wrapped = distributed.wrap(self.model, self.world, cfg.distributed)
        else:  # fully_shard once per model; it swaps parameters for sharded ones, so groups come after
            if self.wrapped is not self.model:
                self.wrapped = distributed.wrap(self.model, self.world, cfg.distributed)
            groups = configure_trainable(self.model, cfg.groups, stage.train)
        for g in groups:
            g["lr"] = base_lr * g["lr_mult"]
        # the fused kernel (also the HF Trainer's default) where parameters are plain tensors
        self.optimizer = torch.optim.AdamW(
            groups, lr=base_lr, betas=cfg.betas, weight_decay=cfg.weight_decay, fused=not sharded
        )
        if state is not None:
            distributed.load_full_state(self.wrapped, self.optimizer, state["model"], state["optimizer"])
            torch.set_rng_state(state["rng"])

    @torch.no_grad()
    def _validate(self, stage) -> dict:
        model = self.wrapped if self.config.distributed == "fsdp" else distributed.unwrap(self.wrapped)
        result = perplexity(
            model, self.val_blocks, batch_size=self.config.micro_batch, progress=False
        )  # restores train()
        return {
            "step": self.progress.step,
            "stage": stage.name,
            "tokens": self.progress.tokens,
            "val_loss": result.nll,
            "val_ppl": result.ppl,
        }

    def _checkpoint(self) -> None:
        model_sd, optim_sd = distributed.full_state(self.wrapped, self.optimizer)
        if self.world.is_main:
            fingerprint = checkpoint.model_fingerprint(model_sd, self.model.config.model_type)
            checkpoint.save(
                self.out,
                self.progress.step,
                model_sd,
                {"progress": asdict(self.progress), "optimizer": optim_sd, "rng": torch.get_rng_state()},
                {
                    "step": self.progress.step,
                    "stage": self.config.stages[self.progress.stage_index].name,
                    "tokens": self.progress.tokens,
                    "model_fingerprint": fingerprint,
                    "model": self.config.model,
                    "run": _run_identity(self.config),
                },
            )
        self.world.barrier()

    def _resume(self) -> dict:
        path = checkpoint.latest(self.out)
        if path is None:
            raise ConfigError(f"resume: no complete checkpoint in {self.out / 'checkpoints'}")
        model_sd, trainer_state, meta = checkpoint.load(path)
        for field, value in _run_identity(self.config).items():
            if meta["run"].get(field) != value:
                raise checkpoint.ResumeMismatch(
                    f"resume: {path} was written with {field}={meta['run'].get(field)!r}, "
                    f"this run has {field}={value!r}"
                )
        progress = Progress(**trainer_state["progress"])
        for index in range(progress.stage_index + 1):
            self._apply_transform(index)
        ours = checkpoint.model_fingerprint(self.model.state_dict(), self.model.config.model_type)
        if ours != meta["model_fingerprint"]:
            raise checkpoint.ResumeMismatch(
                f"resume: {path} was written for another model ({meta.get('model')!r}, "
                f"different parameter names or shapes) than {self.config.model!r}"
            )
        self.progress = progress
        return {"model": model_sd, "optimizer": trainer_state["optimizer"], "rng": trainer_state["rng"]}

    def _finish(self, log: MetricsLog, stage_rows: list[dict], started: float, tokens_at_start: int) -> dict:
        wall = time.perf_counter() - started
        sharded = self.config.distributed == "fsdp" and self.world.size > 1
        model_sd = distributed.full_state(self.wrapped)[0] if sharded else None  # a collective: every rank
        summary = {
            "model": self.config.model,
            "data": self.config.data,
            "processes": self.world.size,
            "steps": self.progress.step,
            "tokens": self.progress.tokens,
            "tokens_this_session": self.progress.tokens - tokens_at_start,
            "wall_s": round(wall, 1),
            "final_train_loss": stage_rows[-1]["train_loss"] if stage_rows else None,
            "final_val_loss": stage_rows[-1]["val_loss"] if stage_rows else None,
        }
        if self.world.is_main:
            final = _plain_model(self.model, model_sd)
            hub.save(final, self.tokenizer, self.out / "final", overwrite=True)
            plot = plot_loss(log.records(), self.out / "loss_curve.png", f"{self.config.model} on {self.config.data}")
            write_report(self.out, self.config.to_yaml(), summary, stage_rows, plot)
        self.world.barrier()
        return summary


def _run_identity(config: TrainConfig) -> dict:
    """Settings that must not change across a resume, or the continuation would not be exact."""
    return {
        "model": config.model,
        "data": config.data,
        "seq_len": config.seq_len,
        "global_batch": config.global_batch,
        "seed": config.seed,
        "stages": [[s.name, s.tokens] for s in config.stages],
    }


def _plain_model(model, state_dict: dict | None):
    """The model itself, or (when FSDP sharded it) a plain copy holding the gathered state dict."""
    if state_dict is None:
        return distributed.unwrap(model)
    plain = AutoModelForCausalLM.from_config(model.config)
    plain.load_state_dict(state_dict)
    return plain
