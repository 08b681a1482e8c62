"""A registered transformers model type for dense models whose FFNs became bank-sparse.

The checkpoint is a plain Hugging Face folder: safetensors holding the base model's own tensor names
(model.layers.3.mlp.gate_proj.weight, ...) plus the predictors (model.layers.3.mlp.predictor.*), and
a config.json of model_type "upcycle_sparse" that carries the base config's fields, the base
model_type and the sparsity. After `import upcycle`, AutoConfig / AutoModelForCausalLM load it like
any other model, and `generate` works. `upcycle densify` writes the base model back out for tools
that do not know this type.
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.initialization import no_init_weights
from transformers.modeling_outputs import CausalLMOutputWithPast

from upcycle.arch import adapter_for
from upcycle.modules.bank_sparse import BankSparseFFN, BankSparsity

MODEL_TYPE = "upcycle_sparse"
_OWN_KEYS = ("model_type", "base_model_type", "sparsity", "architectures", "transformers_version", "auto_map")


def make_sparse_ffn(adapter, i: int, sparsity: BankSparsity, *, take_weights: bool = True):
    """Put a BankSparseFFN in layer i's place (on the dense FFN's device and dtype) and return (it, the
    dense FFN taken out). take_weights: it computes with the dense projections themselves, not copies."""
    config = adapter.config
    dense = adapter.ffn_weights(i)
    sparse = BankSparseFFN(config.hidden_size, dense.width, sparsity, getattr(config, "hidden_act", "silu"))
    sparse = sparse.to(dense.gate.device, dense.gate.dtype)
    old = adapter.set_ffn(i, sparse)
    if take_weights:
        sparse.gate_proj, sparse.up_proj, sparse.down_proj = old.gate_proj, old.up_proj, old.down_proj
    return sparse, old


class UpcycleSparseConfig(PretrainedConfig):
    """The base model's config fields, plus `base_model_type` and `sparsity`:
    {bank, keep, rank, gate, selection, layers: [indices of the bank-sparse layers]}."""

    model_type = MODEL_TYPE

    def __init__(self, base_model_type: str = "llama", sparsity: dict | None = None, **kwargs):
        self.base_model_type = base_model_type
        self.sparsity = dict(sparsity or {})
        super().__init__(**kwargs)

    @classmethod
    def from_base(cls, base_config, sparsity: dict) -> "UpcycleSparseConfig":
        fields = {k: v for k, v in base_config.to_dict().items() if k not in _OWN_KEYS}
        return cls(base_model_type=base_config.model_type, sparsity=sparsity, **fields)

    def base_config(self):
        fields = {k: v for k, v in self.to_dict().items() if k not in _OWN_KEYS}
        return AutoConfig.for_model(self.base_model_type, **fields)

    def layer_sparsity(self) -> BankSparsity:
        saved = {k: v for k, v in self.sparsity.items() if k != "layers"}
        # a model saved before there was a choice made its FFNs with the only one there was then: these
        # are facts about old files, not defaults
        saved.setdefault("predictor", "lowrank")
        saved.setdefault("quantizer", "rtn")
        return BankSparsity(**saved)


class UpcycleSparseForCausalLM(PreTrainedModel, GenerationMixin):
    """The base family's decoder (self.model) and LM head, with bank-sparse FFNs in the listed layers."""

    config_class = UpcycleSparseConfig
    base_model_prefix = "model"
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _supports_sdpa = True
    _no_split_modules = []

    def __init__(self, config: UpcycleSparseConfig, base=None):
        """Built from the config (as from_pretrained does), or around `base`, a loaded dense model of
        the base family whose modules are taken over as they are (see `from_dense`)."""
        super().__init__(config)
        fresh = base is None
        if fresh:
            base = AutoModelForCausalLM.from_config(config.base_config())
        sparsity = config.layer_sparsity()
        adapter = adapter_for(base)
        for i in config.sparsity.get("layers", []):
            make_sparse_ffn(adapter, i, sparsity, take_weights=not fresh)
        self.model = base.model
        self.lm_head = base.lm_head
        self.vocab_size = config.vocab_size
        if fresh:
            self.post_init()
        else:
            with no_init_weights():  # keep the dense weights; predictors are initialised by the caller
                self.post_init()

    @classmethod
    def from_dense(cls, model, sparsity: BankSparsity, layers: list[int]) -> "UpcycleSparseForCausalLM":
        """Take over a dense model's modules (no copy) and make the listed layers bank-sparse."""
        config = UpcycleSparseConfig.from_base(model.config, {**sparsity.to_dict(), "layers": list(layers)})
        return cls(config, base=model)

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def get_output_embeddings(self):
        return self.lm_head

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        logits_to_keep=0,
        **kwargs,
    ):
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden = out.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            hidden = hidden[:, logits_to_keep]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=out.past_key_values,
            hidden_states=out.hidden_states,
            attentions=out.attentions,
        )


def register() -> None:
    """Make the type known to transformers' Auto classes (idempotent; done by `import upcycle`)."""
    try:
        AutoConfig.register(MODEL_TYPE, UpcycleSparseConfig)
    except ValueError:  # already registered
        pass
    try:
        AutoModelForCausalLM.register(UpcycleSparseConfig, UpcycleSparseForCausalLM)
    except ValueError:
        pass
