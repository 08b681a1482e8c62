"""densify: a bank-sparse model -> its base family's stock dense model (predictors dropped)."""

from __future__ import annotations

from transformers import AutoModelForCausalLM

from upcycle.errors import ConfigError
from upcycle.modules import UpcycleSparseForCausalLM


def densify(model):
    """The base family's stock model with the sparse model's weights, predictors dropped: what
    tools that do not know the sparse type can load. It computes every channel, so its outputs are
    the sparse model's with nothing masked (compare them to see how much the masking changes)."""
    if not isinstance(model, UpcycleSparseForCausalLM):
        raise ConfigError(f"densify needs a bank-sparse model (model_type upcycle_sparse), got {type(model).__name__}")
    dense = AutoModelForCausalLM.from_config(model.config.base_config())
    state = {k: v for k, v in model.state_dict().items() if is_dense_tensor(k)}
    dense.load_state_dict(state, strict=True)
    return dense.to(next(model.parameters()).dtype).eval()


def is_dense_tensor(name: str) -> bool:
    """Whether a bank-sparse model's tensor belongs to its dense twin (predictors and thresholds do not)."""
    return ".predictor." not in name and not name.startswith("predictor.") and not name.endswith("threshold")
