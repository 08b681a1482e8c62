"""A stage's transform and callback options are checked when the run config loads: a typo in the last
stage fails before the first training step, from Python and from `upcycle train` alike."""

import pytest

from upcycle.cli import main
from upcycle.errors import ConfigError
from upcycle.train import TrainConfig, register_callback
from upcycle.train.trainer import Callback


def _three_stages(text_folder, tmp_path, third: dict) -> dict:
    return dict(
        model="tiny-llama",
        data=str(text_folder),
        out=str(tmp_path / "run"),
        seq_len=32,
        global_batch=4,
        micro_batch=4,
        progress=False,
        stages=[
            {"name": "one", "tokens": 128},
            {"name": "two", "tokens": 128},
            {"name": "three", "tokens": 128, **third},
        ],
    )


@pytest.mark.parametrize(
    "third,message",
    [
        (
            {"transform": "slim", "transform_options": {"cuts": [{"op": "depth", "layers": 1}], "calibraton": "x"}},
            "stage 'three' transform_options: unknown key 'calibraton'",
        ),
        (
            {"transform": "slim", "transform_options": {"cuts": [{"op": "depth", "layer": 1}]}},
            "layer does not apply to the depth operator",
        ),
        ({"transform": "top_k", "transform_options": {"top": 2}}, "unknown option 'top'; known: k"),
        (
            {"transform": "lora", "transform_options": {"rank": "four"}},
            "rank='four' is not allowed: expected an integer",
        ),
        ({"transform": "sparsify", "transform_options": {"keep": 16, "bnak": 64}}, "unknown key 'bnak'"),
        ({"callbacks": [{"name": "seft", "options": {"evry": 2}}]}, "callback 'seft' options: unknown option 'evry'"),
        ({"transform": "no_such_transform"}, "transform='no_such_transform' is not registered"),
        ({"transform_options": {"cuts": []}}, "transform_options"),
    ],
)
def test_a_typo_in_stage_three_fails_when_the_config_loads(third, message, text_folder, tmp_path):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("'", ".")):
        TrainConfig.from_dict(_three_stages(text_folder, tmp_path, third))
    assert not (tmp_path / "run").exists()  # nothing ran, nothing written


def test_a_typo_in_stage_three_fails_before_upcycle_train_trains(text_folder, tmp_path, capsys):
    import yaml

    cfg = _three_stages(text_folder, tmp_path, {"transform": "slim", "transform_options": {"cutz": []}})
    recipe = tmp_path / "run.yaml"
    recipe.write_text(yaml.safe_dump(cfg))
    assert main(["train", "--config", str(recipe)]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown key 'cutz'" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_callback_options_are_checked_against_the_callbacks_own_parameters(text_folder, tmp_path):
    @register_callback("scaled_for_test")
    class Scaled(Callback):
        def __init__(self, factor: float = 1.0):
            self.factor = factor

    ok = _three_stages(text_folder, tmp_path, {"callbacks": [{"name": "scaled_for_test", "options": {"factor": 2}}]})
    assert TrainConfig.from_dict(ok).stages[2].callbacks[0]["options"] == {"factor": 2}
    bad = _three_stages(text_folder, tmp_path, {"callbacks": [{"name": "scaled_for_test", "options": {"factor": "x"}}]})
    with pytest.raises(ConfigError, match="factor='x' is not allowed: expected a number"):
        TrainConfig.from_dict(bad)
