"""What prefixd needs to know about each supported transformers architecture, in one table.

Everything architecture-specific lives here: how many layers receive a prefix, how many key/value heads
and what head size they have (grouped-query models get prefixes per key/value head, as PEFT does), whether
the model is an encoder-decoder, how it derives token positions, and where its decoder layers are.
Code elsewhere asks `arch_of(model_config)` and never tests `model_type` itself.

Positions matter for mixed-length prefix batches (see `workers/inject.py`):
- "explicit": the model takes `position_ids`; a row with prefix length P gets positions P + t, exactly
  what it gets when run alone (GPT-2 absolute embeddings, Llama-family RoPE).
- "relative": positions only enter as query-key distances (T5), which right-aligned prefixes preserve.
- "from_cache": the decoder derives positions from the cache length and ignores position ids (BART);
  rows must then be grouped by prefix length so that the cache length equals each row's own P.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

CAUSAL_LM = "CAUSAL_LM"
SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"


class UnsupportedModel(ValueError):
    """The base model's architecture is not one prefixd can inject prefixes into."""


@dataclass(frozen=True, kw_only=True)
class Arch:
    """One row of the table: where to read each quantity in a transformers config."""

    model_type: str
    task_type: str  # CAUSAL_LM or SEQ_2_SEQ_LM
    layers: str  # config attribute: layers that receive a prefix
    decoder_layers: str | None  # encoder-decoders: the decoder's layer count (must equal `layers`)
    hidden: str  # config attribute: model width
    heads: str  # config attribute: query heads
    kv_heads: str | None  # config attribute: key/value heads (grouped-query attention)
    head_dim: str | None  # config attribute: head size, when not hidden // heads
    context: str | None  # config attribute: longest sequence, None when unbounded (relative)
    positions: str  # "explicit" | "relative" | "from_cache"
    decoder_layer_path: str  # dotted path from the *ForCausalLM / *ForConditionalGeneration module
    cache_arg_dropped_when_checkpointing: int | None = None
    """GPT-2's model forward itself passes no cache to its blocks while checkpointing in training; the
    positional index of the block argument that carries it, so prefixd can hand the prefix back."""


ARCHS: dict[str, Arch] = {
    a.model_type: a
    for a in (
        Arch(
            model_type="gpt2",
            task_type=CAUSAL_LM,
            layers="n_layer",
            decoder_layers=None,
            hidden="n_embd",
            heads="n_head",
            kv_heads=None,
            head_dim=None,
            context="n_positions",
            positions="explicit",
            decoder_layer_path="transformer.h",
            cache_arg_dropped_when_checkpointing=1,
        ),
        *(  # the Llama family: the same config names and layout
            Arch(
                model_type=model_type,
                task_type=CAUSAL_LM,
                layers="num_hidden_layers",
                decoder_layers=None,
                hidden="hidden_size",
                heads="num_attention_heads",
                kv_heads="num_key_value_heads",
                head_dim="head_dim",
                context="max_position_embeddings",
                positions="explicit",
                decoder_layer_path="model.layers",
            )
            for model_type in ("llama", "mistral", "qwen2")
        ),
        Arch(
            model_type="bart",
            task_type=SEQ_2_SEQ_LM,
            layers="encoder_layers",
            decoder_layers="decoder_layers",
            hidden="d_model",
            heads="decoder_attention_heads",
            kv_heads=None,
            head_dim=None,
            context="max_position_embeddings",
            positions="from_cache",
            decoder_layer_path="model.decoder.layers",
        ),
        Arch(
            model_type="t5",
            task_type=SEQ_2_SEQ_LM,
            layers="num_layers",
            decoder_layers="num_decoder_layers",
            hidden="d_model",
            heads="num_heads",
            kv_heads=None,
            head_dim="d_kv",
            context=None,
            positions="relative",
            decoder_layer_path="decoder.block",
        ),
    )
}


@dataclass(frozen=True, kw_only=True)
class PrefixShape:
    """The model-dependent sizes of a prefix, in PEFT's conventions.

    A prefix of P virtual tokens is a tensor [P, num_layers * 2 * token_dim]; token_dim =
    num_kv_heads * head_dim, i.e. PEFT's `num_attention_heads` is the key/value head count.
    """

    task_type: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    context_length: int | None
    num_transformer_submodules: int

    @property
    def token_dim(self) -> int:
        return self.num_kv_heads * self.head_dim


def arch_of(model_config: Any) -> Arch:
    """The table row for a transformers config; UnsupportedModel names the accepted model types."""
    model_type = getattr(model_config, "model_type", None)
    arch = ARCHS.get(model_type)
    if arch is None:
        raise UnsupportedModel(f"model_type {model_type!r} is not supported; supported: {', '.join(sorted(ARCHS))}")
    return arch


def prefix_shape(model_config: Any) -> PrefixShape:
    """Read the sizes a prefix must have for this model from its config (the config is not modified)."""
    arch = arch_of(model_config)
    get = lambda name: getattr(model_config, name, None) if name else None  # noqa: E731
    layers, hidden, heads = get(arch.layers), get(arch.hidden), get(arch.heads)
    kv_heads = get(arch.kv_heads) or heads
    head_dim = get(arch.head_dim) or hidden // heads
    if arch.decoder_layers and get(arch.decoder_layers) not in (None, layers):
        raise UnsupportedModel(
            f"{arch.model_type}: encoder has {layers} layers but the decoder {get(arch.decoder_layers)}; "
            "PEFT's encoder-decoder prefix layout needs equal counts"
        )
    return PrefixShape(
        task_type=arch.task_type,
        num_layers=layers,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        hidden_size=hidden,
        context_length=get(arch.context),
        num_transformer_submodules=2 if arch.task_type == SEQ_2_SEQ_LM else 1,
    )


def decoder_layers(model: Any) -> list[Any]:
    """The decoder layer modules of a loaded model (the ones whose attention sees the prefix)."""
    module = model
    for part in arch_of(model.config).decoder_layer_path.split("."):
        module = getattr(module, part)
    return list(module)
