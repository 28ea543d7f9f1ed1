"""The prefix itself: PEFT's `PrefixTuningConfig` and `PrefixEncoder`, field for field and key for key.

State-dict keys equal PEFT's (`embedding.weight`, `transform.0.weight`, ...), so weights move both ways.
PEFT's own example runs with this import:

    >>> from workers.prefix import PrefixEncoder, PrefixTuningConfig
    >>> config = PrefixTuningConfig(
    ...     peft_type="PREFIX_TUNING",
    ...     task_type="SEQ_2_SEQ_LM",
    ...     num_virtual_tokens=20,
    ...     token_dim=768,
    ...     num_transformer_submodules=1,
    ...     num_attention_heads=12,
    ...     num_layers=12,
    ...     encoder_hidden_size=768,
    ... )
    >>> prefix_encoder = PrefixEncoder(config)

`configure_for_model(config, model_config)` fills the model-dependent fields from a transformers config
(through the table in `workers/arch.py`) and checks any the caller set.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from workers.arch import CAUSAL_LM, SEQ_2_SEQ_LM, prefix_shape

TASK_TYPES = (CAUSAL_LM, SEQ_2_SEQ_LM)


class PrefixConfigError(ValueError):
    """A prefix configuration that is invalid or does not fit the base model; names the field."""


@dataclass
class PrefixTuningConfig:
    """Configuration of a prefix, with PEFT's field names and meanings.

    Fields left None are model-dependent and filled by `configure_for_model`.
    """

    peft_type: str = "PREFIX_TUNING"
    auto_mapping: dict | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    task_type: str | None = None
    inference_mode: bool = False
    num_virtual_tokens: int | None = None
    """Prefix length P, in virtual tokens."""
    token_dim: int | None = None
    """Width of one layer's keys (or values): key/value heads x head size."""
    num_transformer_submodules: int | None = None
    """1 for decoder-only models, 2 for encoder-decoders (PEFT's convention)."""
    num_attention_heads: int | None = None
    """Key/value heads per layer (for grouped-query models, the key/value head count)."""
    num_layers: int | None = None
    encoder_hidden_size: int | None = None
    """Hidden size of the projection MLP (used only with prefix_projection)."""
    prefix_projection: bool = False
    init_weights: str | None = None
    """None: random init (PEFT's default); "zero": the prefix starts as zeros."""
    modules_to_save: list | None = field(default=None)

    def __post_init__(self) -> None:
        if self.peft_type != "PREFIX_TUNING":
            raise PrefixConfigError(f"peft_type: {self.peft_type!r}; only 'PREFIX_TUNING' is accepted")
        if self.task_type is not None and self.task_type not in TASK_TYPES:
            raise PrefixConfigError(f"task_type: {self.task_type!r}; accepted: {', '.join(TASK_TYPES)}")
        if self.num_virtual_tokens is not None and (
            not isinstance(self.num_virtual_tokens, int) or self.num_virtual_tokens <= 0
        ):
            raise PrefixConfigError(f"num_virtual_tokens: {self.num_virtual_tokens!r}; must be an integer >= 1")
        if self.init_weights not in (None, "zero"):
            raise PrefixConfigError(f"init_weights: {self.init_weights!r}; accepted: None (random), 'zero'")
        for name in ("token_dim", "num_attention_heads", "num_layers", "encoder_hidden_size"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise PrefixConfigError(f"{name}: {value!r}; must be a positive integer")

    @property
    def head_dim(self) -> int:
        return self.token_dim // self.num_attention_heads

    @property
    def prefix_width(self) -> int:
        """Width of the encoder's output per virtual token: num_layers * 2 * token_dim."""
        return self.num_layers * 2 * self.token_dim

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def configure_for_model(
    config: PrefixTuningConfig, model_config: Any, *, max_new_tokens: int = 0
) -> PrefixTuningConfig:
    """A copy of `config` with the model-dependent fields filled from `model_config`.

    Fields the caller already set must agree with the model; each mismatch is reported with the field,
    the given value and the model's value. `max_new_tokens` (tokens the caller will add after the prefix)
    is used to check that the prefix fits the model's context.
    """
    if config.num_virtual_tokens is None:
        raise PrefixConfigError("num_virtual_tokens: not set; must be an integer >= 1")
    shape = prefix_shape(model_config)
    wanted = {
        "task_type": shape.task_type,
        "num_layers": shape.num_layers,
        "token_dim": shape.token_dim,
        "num_attention_heads": shape.num_kv_heads,
        "num_transformer_submodules": shape.num_transformer_submodules,
    }
    problems = [
        f"{name}: {getattr(config, name)!r} does not match the model ({model_config.model_type}: {value!r})"
        for name, value in wanted.items()
        if getattr(config, name) is not None and getattr(config, name) != value
    ]
    if shape.context_length is not None and config.num_virtual_tokens + max_new_tokens >= shape.context_length:
        problems.append(
            f"num_virtual_tokens: {config.num_virtual_tokens} (+{max_new_tokens} tokens of input) does not fit the "
            f"model's context of {shape.context_length} tokens"
        )
    if problems:
        raise PrefixConfigError("; ".join(problems))
    filled = dataclasses.replace(
        config,
        **wanted,
        encoder_hidden_size=config.encoder_hidden_size or shape.token_dim,
        base_model_name_or_path=config.base_model_name_or_path or getattr(model_config, "_name_or_path", None) or None,
    )
    return filled


class PrefixEncoder(nn.Module):
    r"""The `torch.nn` model that encodes the prefix (PEFT's, with the same attributes and state-dict keys).

    Attributes:
        embedding (`nn.Embedding`): the virtual-token embeddings; [P, num_layers*2*token_dim] without
            projection, [P, token_dim] with it.
        transform (`nn.Sequential`): Linear -> Tanh -> Linear, only when `prefix_projection` (and not in
            inference mode).
        prefix_projection (`bool`): whether the embeddings go through `transform`.

    Input shape: (batch_size, num_virtual_tokens), token indices 0..P-1.
    Output shape: (batch_size, num_virtual_tokens, 2*layers*hidden), hidden = token_dim.
    """

    def __init__(self, config: PrefixTuningConfig):
        super().__init__()
        for name in ("num_virtual_tokens", "token_dim", "num_layers"):
            if getattr(config, name) is None:
                raise PrefixConfigError(f"{name}: not set; call configure_for_model or set it explicitly")
        self.prefix_projection = config.prefix_projection
        token_dim, num_layers, p = config.token_dim, config.num_layers, config.num_virtual_tokens
        # In inference mode PEFT keeps only the encoded prefix (no MLP), as it saves it.
        self._project = self.prefix_projection and not config.inference_mode
        if self._project:
            hidden = config.encoder_hidden_size or token_dim
            self.embedding = nn.Embedding(p, token_dim)
            self.transform = nn.Sequential(
                nn.Linear(token_dim, hidden),
                nn.Tanh(),
                nn.Linear(hidden, num_layers * 2 * token_dim),
            )
            if config.init_weights == "zero":
                nn.init.zeros_(self.transform[-1].weight)
                nn.init.zeros_(self.transform[-1].bias)
        else:
            self.embedding = nn.Embedding(p, num_layers * 2 * token_dim)
            if config.init_weights == "zero":
                nn.init.zeros_(self.embedding.weight)

    def forward(self, prefix: torch.Tensor) -> torch.Tensor:
        if self._project:
            return self.transform(self.embedding(prefix))
        return self.embedding(prefix)

    def prompt_embeddings(self) -> torch.Tensor:
        """The encoded prefix for tokens 0..P-1, [P, num_layers*2*token_dim] (PEFT's `prompt_embeddings`)."""
        tokens = torch.arange(self.embedding.num_embeddings, device=self.embedding.weight.device)
        return self(tokens.unsqueeze(0))[0]
