"""The adapter: the one place that knows where a Hugging Face model keeps its parts.

Transforms ask an adapter for "layer 3's FFN weights" or "layer 5's router"; they never spell
`model.model.layers[3].mlp.gate_proj`. Families differ mostly in config key names and in what an
MoE block holds (a shared expert or not), so one base class does the work and a family states only
its differences (see families.py).

Conventions (transformers 5):
- a dense SwiGLU FFN is a module with gate_proj (F, H), up_proj (F, H), down_proj (H, F);
- an MoE block has `gate` (router, weight (E, H)) and `experts` with fused 3-D parameters
  gate_up_proj (E, 2F, H) — gate rows first, then up rows — and down_proj (E, H, F).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from transformers.initialization import no_init_weights

from upcycle.errors import ConfigError, UnsupportedArchitecture


@dataclass
class SwiGLUWeights:
    """One SwiGLU FFN: y = down @ (act(gate @ x) * (up @ x)). Shapes: gate, up (F, H); down (H, F)."""

    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor

    @property
    def width(self) -> int:
        return self.gate.shape[0]

    def clone(self) -> "SwiGLUWeights":
        return SwiGLUWeights(self.gate.detach().clone(), self.up.detach().clone(), self.down.detach().clone())


@dataclass
class LayerShape:
    """One row of a model summary: what a decoder layer's FFN is."""

    index: int
    kind: str  # "dense", "moe" or the class name of a replaced module
    ffn_width: int | None = None  # dense width, or each routed expert's width
    experts: int | None = None
    top_k: int | None = None
    shared_width: int | None = None
    params: int = 0


class Adapter:
    """Reads and writes the parts of one causal LM. Subclasses name their family's config keys."""

    family: ClassVar[str] = ""
    model_types: ClassVar[tuple[str, ...]] = ()  # the transformers model_type(s) this adapter reads
    is_moe: ClassVar[bool] = False  # its FFNs are mixtures of experts
    has_shared_expert: ClassVar[bool] = False  # MoE: an always-on shared expert beside the routed ones
    moe_targets: ClassVar[tuple[str, ...]] = ()  # dense: the MoE families its layers can become (first: default)
    # canonical name -> this family's config key; transforms speak only canonical names
    config_keys: ClassVar[dict[str, str]] = {
        "hidden_size": "hidden_size",
        "num_layers": "num_hidden_layers",
        "ffn_size": "intermediate_size",
        "vocab_size": "vocab_size",
        "head_dim": "head_dim",
        "norm_eps": "rms_norm_eps",
    }

    # how a checkpoint names an MoE layer's FFN and each expert's (gate, up, down) matrices: transformers 5
    # fuses the experts into 3-D tensors in the module and splits them again in the files it writes
    checkpoint_ffn: ClassVar[str] = "mlp"
    checkpoint_experts: ClassVar[tuple[str, str, str]] = ("gate_proj", "up_proj", "down_proj")

    @classmethod
    def layer_to_checkpoint(cls, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One decoder layer's tensors (names relative to the layer, as its state_dict has them) under the
        names a checkpoint file uses: the same for a dense family; experts split one by one for MoE."""
        if not cls.is_moe:
            return dict(tensors)
        gate, up, down = cls.checkpoint_experts
        out = {}
        for name, t in tensors.items():
            prefix = f"{cls.checkpoint_ffn}.experts"
            if name == "mlp.experts.gate_up_proj":
                width = t.shape[1] // 2
                for e in range(t.shape[0]):
                    out[f"{prefix}.{e}.{gate}.weight"], out[f"{prefix}.{e}.{up}.weight"] = t[e, :width], t[e, width:]
            elif name == "mlp.experts.down_proj":
                out.update({f"{prefix}.{e}.{down}.weight": t[e] for e in range(t.shape[0])})
            else:
                out[cls.checkpoint_ffn + name[3:] if name.startswith("mlp.") else name] = t
        return out

    @classmethod
    def layer_from_checkpoint(cls, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The inverse of layer_to_checkpoint: a checkpoint's tensors of one layer as its module names them.
        The dict given is consumed (emptied): each expert's tensors are freed as they are copied into the
        fused ones, so a layer is never held twice."""
        if not cls.is_moe:
            return dict(tensors)
        gate, up, down = cls.checkpoint_experts
        experts: dict[str, dict[int, torch.Tensor]] = {gate: {}, up: {}, down: {}}
        out = {}
        for name in list(tensors):
            parts = name.split(".")
            if parts[0] == cls.checkpoint_ffn and parts[1] == "experts":
                experts[parts[3]][int(parts[2])] = tensors.pop(name)
            else:
                out["mlp" + name[len(cls.checkpoint_ffn) :] if parts[0] == cls.checkpoint_ffn else name] = tensors.pop(
                    name
                )
        if experts[gate]:
            order = sorted(experts[gate])
            first = experts[gate][order[0]]
            width, hidden = first.shape
            fused = first.new_empty(len(order), 2 * width, hidden)
            for n, e in enumerate(order):
                fused[n, :width], fused[n, width:] = experts[gate].pop(e), experts[up].pop(e)
            out["mlp.experts.gate_up_proj"] = fused
            first = experts[down][order[0]]
            fused = first.new_empty(len(order), *first.shape)
            for n, e in enumerate(order):
                fused[n] = experts[down].pop(e)
            out["mlp.experts.down_proj"] = fused
        return out

    @classmethod
    def moe_fields(
        cls, *, experts: int, expert_width: int, shared_width: int | None, normalize: bool, attention_bias: str | None
    ) -> dict:
        """MoE families: the config fields (beyond the dense ones) of a model of this family whose layers
        hold `experts` routed experts; UnsupportedArchitecture where the source cannot be written so."""
        raise UnsupportedArchitecture(f"{cls.family} is not a mixture-of-experts family")

    @classmethod
    def tiny_fields(cls, *, experts: int, top_k: int, ffn: int) -> dict:
        """The config fields a tiny random test model of this family adds to the common ones."""
        return {}

    def __init__(self, model: nn.Module):
        self.model = model

    # ---- whole model -------------------------------------------------------------------------
    @property
    def config(self):
        return self.model.config

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.model.layers

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    def embedding(self) -> nn.Embedding:
        return self.model.get_input_embeddings()

    def lm_head(self) -> nn.Linear:
        return self.model.get_output_embeddings()

    def final_norm(self) -> nn.Module:
        return self.model.model.norm

    def reset_buffers(self, device) -> None:
        """Compute again, on `device`, the tables a model makes when it is built and never saves (the rotary
        frequencies): what a model built on the meta device lacks once its weights are loaded."""
        rotary = self.model.model.rotary_emb
        with torch.device("cpu"):
            self.model.model.rotary_emb = type(rotary)(config=self.config).to(device)

    # ---- decoding ----------------------------------------------------------------------------
    # a decoder layer of Llama's shape (pre-norm RMSNorm, q/k/v/o with rotate-half rotary, per-head q/k
    # norms or none, full causal attention): what the kernels' one-call decoding step computes (decode_step.h)
    llama_shaped: ClassVar[bool] = False

    def rotary_tables(self, positions: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's own rotary cos and sin [positions, head_dim] in fp32 (its scaling, if any, applied)."""
        ids = torch.arange(positions)[None]
        cos, sin = self.model.model.rotary_emb(torch.zeros(1, dtype=torch.float32), ids)
        return cos[0].float().contiguous(), sin[0].float().contiguous()

    def head_norms(self, i: int) -> tuple[nn.Module, nn.Module] | None:
        """Layer i's per-head RMSNorms of q and k, applied before the rotary embedding (Qwen3), or None."""
        return None

    def attention_scaling(self, i: int) -> float:
        return float(self.layer(i).self_attn.scaling)

    def norm_eps(self, norm: nn.Module) -> float:
        return float(norm.variance_epsilon)

    @staticmethod
    def cache_tensors(cache, i: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Layer i's (keys, values) [batch, kv_heads, positions, head_dim] of a transformers StaticCache,
        or None before its first update allocates them."""
        layer = cache.layers[i]
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        return None if keys is None or values is None else (keys, values)

    # ---- one decoder layer -------------------------------------------------------------------
    def layer(self, i: int) -> nn.Module:
        if not -self.num_layers <= i < self.num_layers:
            raise ConfigError(f"layer={i} is out of range: this model has {self.num_layers} layers")
        return self.layers[i]

    def attention(self, i: int) -> dict[str, nn.Linear]:
        attn = self.layer(i).self_attn
        return {name: getattr(attn, f"{name}_proj") for name in ("q", "k", "v", "o")}

    def linears(self, i: int) -> dict[str, nn.Linear]:
        """Every nn.Linear of layer i that computes (attention, FFN, shared expert), by its name in the
        layer: what weight pruning sparsifies. A router and a shared-expert gate are left out: their rows
        choose between paths, and a zero there is not a cheaper product."""
        layer, skip = self.layer(i), set()
        if self.ffn_kind(i) == "moe":
            skip.add(id(self.router(i)))
            if self.shared_expert_gate(i) is not None:
                skip.add(id(self.shared_expert_gate(i)))
        return {
            name: module
            for name, module in layer.named_modules()
            if isinstance(module, nn.Linear) and id(module) not in skip
        }

    def shared_input_linears(self, i: int) -> list[list[str]]:
        """Groups of layer i's linear layers (names in the layer, as `linears` gives them) that always read
        the same input, in the order the layer calls them: attention's q, k and v; a SwiGLU FFN's gate and
        up. A group some of whose names the layer does not have is not a group of this layer."""
        return [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["mlp.gate_proj", "mlp.up_proj"]]

    def norms(self, i: int) -> dict[str, nn.Module]:
        layer = self.layer(i)
        return {"input": layer.input_layernorm, "post_attention": layer.post_attention_layernorm}

    def ffn(self, i: int) -> nn.Module:
        return self.layer(i).mlp

    def set_ffn(self, i: int, module: nn.Module) -> nn.Module:
        """Put `module` where layer i's FFN is (input: normed hidden states (B, T, H) -> (B, T, H)).
        Returns the module it replaced."""
        old = self.ffn(i)
        self.layer(i).mlp = module
        return old

    def ffn_kind(self, i: int) -> str:
        ffn = self.ffn(i)
        if isinstance(getattr(type(ffn), "ffn_kind", None), str):  # upcycle's own FFNs name their kind
            return type(ffn).ffn_kind
        if _is_moe_block(ffn):
            return "moe"
        if _is_swiglu(ffn):
            return "dense"
        return type(ffn).__name__

    # ---- dense SwiGLU FFN --------------------------------------------------------------------
    def ffn_weights(self, i: int) -> SwiGLUWeights:
        """Layer i's dense FFN matrices (the live parameters, not copies)."""
        ffn = self._dense(i)
        return SwiGLUWeights(ffn.gate_proj.weight, ffn.up_proj.weight, ffn.down_proj.weight)

    def set_ffn_weights(self, i: int, weights: SwiGLUWeights) -> None:
        """Write layer i's dense FFN; a new width replaces the parameters (config is the caller's:
        see set_config)."""
        ffn = self._dense(i)
        _write_linear(ffn.gate_proj, weights.gate)
        _write_linear(ffn.up_proj, weights.up)
        _write_linear(ffn.down_proj, weights.down)
        if hasattr(ffn, "intermediate_size"):
            ffn.intermediate_size = weights.width

    def _dense(self, i: int) -> nn.Module:
        ffn = self.ffn(i)
        if not _is_swiglu(ffn):
            raise ConfigError(f"layer {i}'s FFN is {self.ffn_kind(i)}, not a dense SwiGLU FFN")
        return ffn

    # ---- mixture of experts ------------------------------------------------------------------
    def router(self, i: int) -> nn.Module:
        """Layer i's router: a module whose `weight` is (E, H)."""
        return self._moe(i).gate

    def num_experts(self, i: int) -> int:
        return self._moe(i).experts.gate_up_proj.shape[0]

    def top_k(self, i: int) -> int:
        return self._moe(i).gate.top_k

    def normalizes_top_k(self, i: int) -> bool:
        """Whether layer i renormalises its top-k router weights to sum to one (Mixtral always does)."""
        return bool(getattr(self._moe(i).gate, "norm_topk_prob", True))

    def expert_weights(self, i: int, e: int) -> SwiGLUWeights:
        """Expert e of layer i as views into the fused tensors (writes through them change the model)."""
        experts = self._moe(i).experts
        self._check_expert(i, e)
        gate, up = experts.gate_up_proj[e].chunk(2, dim=0)
        return SwiGLUWeights(gate, up, experts.down_proj[e])

    def set_expert_weights(self, i: int, e: int, weights: SwiGLUWeights) -> None:
        experts = self._moe(i).experts
        self._check_expert(i, e)
        width = experts.down_proj.shape[-1]
        if weights.width != width or weights.gate.shape[1] != self.hidden_size:
            raise ConfigError(
                f"expert weights of width {weights.width} do not fit layer {i}'s experts "
                f"(width {width}, hidden {self.hidden_size})"
            )
        with torch.no_grad():
            experts.gate_up_proj[e].copy_(torch.cat([weights.gate, weights.up], dim=0))
            experts.down_proj[e].copy_(weights.down)

    def shared_expert(self, i: int) -> SwiGLUWeights | None:
        """The always-on shared expert of layer i, if the family has one."""
        shared = getattr(self._moe(i), "shared_expert", None)
        if shared is None:
            return None
        return SwiGLUWeights(shared.gate_proj.weight, shared.up_proj.weight, shared.down_proj.weight)

    def _moe(self, i: int) -> nn.Module:
        ffn = self.ffn(i)
        if not _is_moe_block(ffn):
            raise ConfigError(f"layer {i}'s FFN is {self.ffn_kind(i)}, not a mixture of experts")
        return ffn

    def _check_expert(self, i: int, e: int) -> None:
        n = self.num_experts(i)
        if not 0 <= e < n:
            raise ConfigError(f"expert={e} is out of range: layer {i} has {n} experts")

    def experts(self, i: int) -> SwiGLUWeights:
        """All routed experts of layer i stacked: gate, up (E, F, H) and down (E, H, F) (views of the
        fused parameters)."""
        experts = self._moe(i).experts
        gate, up = experts.gate_up_proj.chunk(2, dim=1)
        return SwiGLUWeights(gate, up, experts.down_proj)

    def set_experts(self, i: int, weights: SwiGLUWeights) -> None:
        """Replace layer i's routed experts with stacked gate, up (E, F, H) and down (E, H, F); the
        number of experts and their width may change (set the config to match: set_config). The
        values are copied straight into the fused tensors (no concatenated temporary)."""
        experts = self._moe(i).experts
        E, F, H = weights.gate.shape
        with torch.no_grad():
            gate_up = experts.gate_up_proj
            if gate_up.shape != (E, 2 * F, H):
                experts.gate_up_proj = gate_up = nn.Parameter(torch.empty(E, 2 * F, H, dtype=gate_up.dtype))
            gate_up[:, :F].copy_(weights.gate)
            gate_up[:, F:].copy_(weights.up)
            if experts.down_proj.shape != weights.down.shape:
                experts.down_proj = nn.Parameter(torch.empty(weights.down.shape, dtype=experts.down_proj.dtype))
            experts.down_proj.copy_(weights.down)

    def set_router(self, i: int, weight: torch.Tensor) -> None:
        """Replace layer i's router weight (E, H); E may change (set the config to match)."""
        router = self.router(i)
        with torch.no_grad():
            if router.weight.shape == weight.shape:
                router.weight.copy_(weight)
            else:
                router.weight = nn.Parameter(weight.detach().clone().to(router.weight.dtype))

    def shared_expert_gate(self, i: int) -> nn.Linear | None:
        """The (1, H) linear whose sigmoid scales the shared expert (Qwen2-MoE), if there is one."""
        return getattr(self._moe(i), "shared_expert_gate", None)

    def residual_writers(self, i: int) -> list[torch.Tensor]:
        """Every parameter through which layer i adds to the residual stream: the attention output
        projection (and its bias) and the FFN's down projections (dense, routed, shared). Zeroing
        them makes the layer an identity."""
        o = self.attention(i)["o"]
        writers = [o.weight] + ([o.bias] if o.bias is not None else [])
        kind = self.ffn_kind(i)
        if kind == "dense":
            writers.append(self.ffn_weights(i).down)
        elif kind == "moe":
            writers.append(self._moe(i).experts.down_proj)
            shared = self.shared_expert(i)
            if shared is not None:
                writers.append(shared.down)
        else:
            raise ConfigError(f"layer {i}'s FFN is {kind}: upcycle cannot say where it writes")
        return writers

    def set_layers(self, layers: list[nn.Module], origin: list[int]) -> None:
        """Make `layers` the decoder stack; origin[j] is the index (in the current stack) of the layer
        that new layer j was made from, so per-layer config lists (attention types, dense-only
        layers) follow their layers. Renumbers each layer's KV-cache slot."""
        for j, layer in enumerate(layers):
            for module in layer.modules():
                if hasattr(module, "layer_idx"):
                    module.layer_idx = j
        self.model.model.layers = nn.ModuleList(layers)
        self.set_layer_origin(origin)

    def set_layer_origin(self, origin: list[int]) -> None:
        """The config of a stack whose layer j was made from current layer origin[j]: its layer count and
        per-layer lists (a streamed verb writes the layers itself and sets only this)."""
        config = self.config
        if getattr(config, "layer_types", None) is not None:
            config.layer_types = [config.layer_types[o] for o in origin]
        if getattr(config, "mlp_only_layers", None):
            config.mlp_only_layers = [j for j, o in enumerate(origin) if o in set(config.mlp_only_layers)]
        setattr(config, self._key("num_layers"), len(origin))
        if getattr(config, "max_window_layers", None) is not None:
            config.max_window_layers = min(config.max_window_layers, len(origin))

    def set_query_heads(self, heads: int) -> None:
        """Record that every layer now has `heads` query heads (their q/o projections already cut): the
        config and the grouping each attention module cached at construction."""
        self.config.num_attention_heads = heads
        groups = heads // self.config.num_key_value_heads
        for i in range(self.num_layers):
            attention = self.layer(i).self_attn
            if hasattr(attention, "num_key_value_groups"):
                attention.num_key_value_groups = groups

    def hidden_parameters(self) -> dict[str, tuple[int, str]]:
        """Every parameter with an axis of the hidden size: name -> (axis, role), role one of
        'embedding' (a row per token, read into the residual stream), 'writes' (produces a
        residual-stream vector), 'reads' (consumes a normed one) and 'norm' (a per-channel scale).
        A tied LM head appears once, as the embedding."""
        names = {id(p): n for n, p in self.model.named_parameters()}
        roles: dict[str, tuple[int, str]] = {}

        def add(param, axis, role):
            if param is not None and id(param) in names and names[id(param)] not in roles:
                roles[names[id(param)]] = (axis, role)

        add(self.embedding().weight, 1, "embedding")
        add(self.lm_head().weight, 1, "reads")
        add(self.final_norm().weight, 0, "norm")
        for i in range(self.num_layers):
            for norm in self.norms(i).values():
                add(norm.weight, 0, "norm")
            for name, proj in self.attention(i).items():
                if name == "o":
                    add(proj.weight, 0, "writes")
                    add(proj.bias, 0, "writes")
                else:
                    add(proj.weight, 1, "reads")
            kind = self.ffn_kind(i)
            if kind == "dense":
                w = self.ffn_weights(i)
                add(w.gate, 1, "reads"), add(w.up, 1, "reads"), add(w.down, 0, "writes")
            elif kind == "moe":
                block = self._moe(i)
                add(block.gate.weight, 1, "reads")
                add(block.experts.gate_up_proj, 2, "reads")
                add(block.experts.down_proj, 1, "writes")
                shared = self.shared_expert(i)
                if shared is not None:
                    add(shared.gate, 1, "reads"), add(shared.up, 1, "reads"), add(shared.down, 0, "writes")
                gate = self.shared_expert_gate(i)
                if gate is not None:
                    add(gate.weight, 1, "reads")
            else:
                raise ConfigError(f"layer {i}'s FFN is {kind}: upcycle cannot resize it")
        unknown = [
            n
            for n, p in self.model.named_parameters()
            if n not in roles
            and self.hidden_size in p.shape
            and not n.endswith(("q_norm.weight", "k_norm.weight", "q_proj.bias", "k_proj.bias", "v_proj.bias"))
        ]
        if unknown:
            raise ConfigError(f"{self.family}: upcycle does not know the hidden axis of {unknown[0]}")
        return roles

    # ---- configuration -----------------------------------------------------------------------
    def get_config(self, name: str):
        return getattr(self.config, self._key(name))

    def set_config(self, **changes) -> None:
        """Change config values by canonical name (see config_keys) and the copies of them that
        modules keep (e.g. each router's top_k), so the live model and a model rebuilt from the
        config agree."""
        for name, value in changes.items():
            setattr(self.config, self._key(name), value)
            self._mirror(name, value)

    def _mirror(self, name: str, value) -> None:
        """Copy a changed config value into the attributes that MoE modules cached at construction.
        Only MoE blocks and the top-level model are touched: other modules (e.g. upcycle's own
        sparse FFN) may use the same attribute names for other things."""
        owners = [self.model]
        for i in range(self.num_layers):
            if self.ffn_kind(i) == "moe":
                block = self.ffn(i)
                owners += [block, block.gate, block.experts]
        for owner in owners:
            for attr in _MIRRORED.get(name, ()):
                if hasattr(owner, attr):
                    setattr(owner, attr, value)

    def _key(self, name: str) -> str:
        if name not in self.config_keys:
            raise ConfigError(
                f"config name {name!r} is not known for {self.family}: "
                f"choose from {', '.join(sorted(self.config_keys))}"
            )
        return self.config_keys[name]

    def rebuilt(self, config, changes: dict, state_dict: dict[str, torch.Tensor]) -> nn.Module:
        """A new model of this class from `config` (a copy the caller owns) with canonical `changes`
        applied, holding the tensors of `state_dict` themselves (no copy: a resized model is built
        without a second copy of its weights in memory)."""
        for name, value in changes.items():
            setattr(config, self._key(name), value)
        with no_init_weights():  # untouched uninitialised memory costs nothing until it is replaced
            fresh = type(self.model)(config)
        fresh.load_state_dict(state_dict, strict=True, assign=True)
        fresh.tie_weights()
        return fresh.to(next(self.model.parameters()).dtype).eval()

    def rebuild(self, state_dict: dict[str, torch.Tensor] | None = None) -> nn.Module:
        """A fresh model of the same class built from the current config, holding `state_dict`
        (default: this model's). Proves that the config describes the weights."""
        with no_init_weights():  # every parameter is loaded next: drawing them first is wasted time
            fresh = type(self.model)(self.config)
        fresh.load_state_dict(state_dict if state_dict is not None else self.model.state_dict(), strict=True)
        return fresh.to(next(self.model.parameters()).dtype).eval()

    # ---- canonical parameter groups -------------------------------------------------------------
    def parameter_groups(self) -> dict[str, list[str]]:
        """Every canonical group (PARAMETER_GROUPS) -> the names (as named_parameters gives them) of
        its parameters in this model, so run configs can say `ffn` or `router` on any family. `ffn`
        is each layer's whole FFN (dense, MoE block or bank-sparse) except a predictor; a tied LM
        head shares its one tensor (and name) with the embeddings."""
        names = {id(p): n for n, p in self.model.named_parameters()}
        modules: dict[str, list[nn.Module]] = {g: [] for g in PARAMETER_GROUPS}
        modules["embeddings"].append(self.embedding())
        modules["lm_head"].append(self.lm_head())
        modules["norms"].append(self.final_norm())
        for i in range(self.num_layers):
            layer, ffn = self.layer(i), self.ffn(i)
            modules["attention"].append(layer.self_attn)
            modules["norms"] += list(self.norms(i).values())
            modules["ffn"].append(ffn)
            if getattr(ffn, "predictor", None) is not None:
                modules["predictor"].append(ffn.predictor)
            if _is_moe_block(ffn):
                modules["router"].append(ffn.gate)
                modules["experts"].append(ffn.experts)
                modules["shared_expert"] += [
                    m
                    for m in (getattr(ffn, "shared_expert", None), getattr(ffn, "shared_expert_gate", None))
                    if m is not None
                ]
        predictor = {id(p) for m in modules["predictor"] for p in m.parameters()}
        groups = {}
        for group, members in modules.items():
            ids = dict.fromkeys(
                id(p) for m in members for p in m.parameters() if not (group == "ffn" and id(p) in predictor)
            )
            groups[group] = [names[i] for i in ids if i in names]
        return groups

    # ---- summary -----------------------------------------------------------------------------
    def layer_shape(self, i: int) -> LayerShape:
        kind = self.ffn_kind(i)
        params = sum(p.numel() for p in self.ffn(i).parameters())
        if kind == "dense":
            return LayerShape(i, kind, ffn_width=self.ffn_weights(i).width, params=params)
        if kind == "moe":
            shared = self.shared_expert(i)
            return LayerShape(
                i,
                kind,
                ffn_width=self._moe(i).experts.down_proj.shape[-1],
                experts=self.num_experts(i),
                top_k=self.top_k(i),
                shared_width=shared.width if shared is not None else None,
                params=params,
            )
        return LayerShape(i, kind, params=params)


PARAMETER_GROUPS = (
    "embeddings",
    "lm_head",
    "attention",
    "norms",
    "ffn",
    "router",
    "experts",
    "shared_expert",
    "predictor",
)

# module attributes that transformers copies from the config at construction, by canonical name
_MIRRORED = {
    "top_k": ("top_k", "num_experts_per_tok"),
    "num_experts": ("num_experts",),
    "expert_ffn_size": ("intermediate_dim",),
}


def _is_swiglu(module: nn.Module) -> bool:
    return all(isinstance(getattr(module, n, None), nn.Linear) for n in ("gate_proj", "up_proj", "down_proj"))


def _is_moe_block(module: nn.Module) -> bool:
    experts = getattr(module, "experts", None)
    return experts is not None and hasattr(experts, "gate_up_proj") and hasattr(module, "gate")


def _write_linear(linear: nn.Linear, weight: torch.Tensor) -> None:
    with torch.no_grad():
        if linear.weight.shape == weight.shape:
            linear.weight.copy_(weight)
        else:
            linear.weight = nn.Parameter(weight.detach().clone().to(linear.weight.dtype))
            linear.out_features, linear.in_features = weight.shape
