"""The grow stage transform: a lineage — dense → MoE, train, more experts, train — as stages of one run,
each growth checked against the model the stage before trained (by the transform, and here independently:
the logits at one stage's end against the grown model's before it trains)."""

import pytest
import torch

from upcycle import arch
from upcycle.errors import ConfigError
from upcycle.train import TrainConfig, Trainer
from upcycle.train.trainer import Callback


class LogitsAtStageEdges(Callback):
    """The model's logits on fixed tokens when each stage starts (after its transform) and ends."""

    def __init__(self, ids):
        self.ids, self.start, self.end = ids, {}, {}

    def _logits(self, trainer):
        model = trainer.model
        was = model.training
        model.eval()
        with torch.no_grad():
            out = model(input_ids=self.ids).logits.clone()
        model.train(was)
        return out

    def on_stage_start(self, trainer):
        self.start[trainer.progress.stage_index] = self._logits(trainer)

    def on_stage_end(self, trainer):
        self.end[trainer.progress.stage_index] = self._logits(trainer)


def _lineage(text_folder, tmp_path, second_step: dict) -> TrainConfig:
    grow = {"calibration": str(text_folder), "calibration_tokens": 128, "seq_len": 32, "held_tokens": 64}
    moe = {"op": "moe", "family": "qwen2_moe", "mode": "shared", "experts": 4, "top_k": 2, "router": "random"}
    return TrainConfig.from_dict(
        dict(
            model="tiny-llama",
            data=str(text_folder),
            out=str(tmp_path / "run"),
            seq_len=32,
            global_batch=4,
            micro_batch=4,
            lr=1e-2,
            progress=False,
            stages=[
                {"name": "moe", "tokens": 384, "transform": "grow", "transform_options": {**grow, "steps": [moe]}},
                {
                    "name": "more",
                    "tokens": 256,
                    "transform": "grow",
                    "transform_options": {**grow, "steps": [second_step]},
                },
            ],
        )  # fmt: skip
    )


def test_a_lineage_grows_trains_grows_again_and_each_growth_keeps_the_trained_function(text_folder, tmp_path):
    config = _lineage(text_folder, tmp_path, {"op": "experts", "factor": 2})
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    edges = LogitsAtStageEdges(ids)
    trainer = Trainer(config, callbacks=[edges])
    trainer.fit()
    first, second = trainer.stage_reports["moe"][0], trainer.stage_reports["more"][0]
    assert first.kind == "exact" and first.preservation.passed and first.model_type == "qwen2_moe"
    assert second.kind == "exact" and second.preservation.passed and second.params_after > second.params_before
    assert arch.adapter_for(trainer.model).experts(0).gate.shape[0] == 8
    # independent of the transform's own check: the model the first stage trained and the grown one agree
    assert (edges.end[0] - edges.start[1]).abs().max().item() <= 1e-4
    assert (edges.start[0] - edges.end[0]).abs().max().item() > 1e-3  # the first stage did train


def test_a_bad_growth_step_fails_when_the_run_config_loads(text_folder, tmp_path):
    with pytest.raises(ConfigError, match="factr"):
        _lineage(text_folder, tmp_path, {"op": "experts", "factr": 2})
    assert not (tmp_path / "run").exists()
