"""What a model is: family, sizes, parameter counts and a per-layer FFN / MoE table (`upcycle inspect`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from upcycle import arch
from upcycle.arch import LayerShape
from upcycle.report import markdown_table, millions


@dataclass
class ModelSummary:
    family: str
    model_class: str
    layers: int
    hidden: int
    vocab: int
    heads: int
    kv_heads: int
    parameters: int
    embedding_parameters: int
    tied_embeddings: bool
    layer_shapes: list[LayerShape] = field(default_factory=list)

    @property
    def ffn_widths(self) -> list[int | None]:
        return [s.ffn_width for s in self.layer_shapes]

    def as_dict(self) -> dict:
        return asdict(self)


def parameter_count(model) -> int:
    """Every parameter the model holds, as `model.parameters()` yields them (a tied tensor once)."""
    return sum(p.numel() for p in model.parameters())


def summarize(model) -> ModelSummary:
    adapter = arch.adapter_for(model)
    config = adapter.config
    unique = {p.data_ptr(): p.numel() for p in model.parameters()}  # tied tensors count once
    embed = adapter.embedding().weight
    head = adapter.lm_head()
    tied = head is not None and head.weight.data_ptr() == embed.data_ptr()
    return ModelSummary(
        family=adapter.family,
        model_class=type(model).__name__,
        layers=adapter.num_layers,
        hidden=adapter.hidden_size,
        vocab=embed.shape[0],
        heads=config.num_attention_heads,
        kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
        parameters=sum(unique.values()),
        embedding_parameters=embed.numel(),
        tied_embeddings=tied,
        layer_shapes=[adapter.layer_shape(i) for i in range(adapter.num_layers)],
    )


def layer_groups(summary: ModelSummary) -> list[tuple[str, LayerShape]]:
    """Runs of consecutive layers with the same FFN shape, as ("0-29", shape) pairs."""
    groups: list[tuple[int, int, LayerShape]] = []
    for shape in summary.layer_shapes:
        if groups and _key(groups[-1][2]) == _key(shape):
            groups[-1] = (groups[-1][0], shape.index, groups[-1][2])
        else:
            groups.append((shape.index, shape.index, shape))
    return [(f"{a}" if a == b else f"{a}-{b}", s) for a, b, s in groups]


def _key(shape: LayerShape):
    return (shape.kind, shape.ffn_width, shape.experts, shape.top_k, shape.shared_width, shape.params)


def format_summary(summary: ModelSummary) -> str:
    lines = [
        f"family      {summary.family} ({summary.model_class})",
        f"layers      {summary.layers}",
        f"hidden      {summary.hidden}",
        f"heads       {summary.heads} query, {summary.kv_heads} key/value",
        f"vocab       {summary.vocab}" + ("  (embeddings tied to the LM head)" if summary.tied_embeddings else ""),
        f"parameters  {millions(summary.parameters)} ({summary.parameters:,}; embeddings {millions(summary.embedding_parameters)})",
        "",
    ]
    rows = []
    for span, s in layer_groups(summary):
        ffn = (
            f"{s.ffn_width}"
            if s.kind == "dense"
            else (
                f"{s.experts} x {s.ffn_width}, top-{s.top_k}" + (f", shared {s.shared_width}" if s.shared_width else "")
                if s.kind == "moe"
                else s.kind
            )
        )
        rows.append([span, s.kind, ffn, millions(s.params)])
    lines.append(markdown_table(["layers", "FFN", "width (experts x width)", "FFN params / layer"], rows))
    return "\n".join(lines)
