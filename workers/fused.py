"""Compiled decoder layers for training forwards: Llama, Mistral and Qwen2, all layers one `torch.compile` graph.

`decoder_layer` is `LlamaDecoderLayer.forward` with prefixd's read-only prefix cache, written as a pure
function of the layer's weights (`layer_weights`), the prefix keys and values [B, H_kv, P, D], the rotary
cos/sin [B, T, D] and the model's 4D mask over [P + T], so every layer shares one compiled graph. Attention
is `_attention` (grouped queries, additive mask: `additive_mask`); the loss is `TokenCrossEntropy`.

    compiled = CompiledLayers(model, arch.decoder_layers(model))  # raises UnsupportedLayers, naming why
    with compiled.installed(cache):                                # cache: `inject.training_cache(...)`
        out = model(input_ids, attention_mask=mask, cache=cache)   # layers 2..L run compiled

Invariants: results equal the eager layers' to float rounding (~1e-6 relative in fp32, not bitwise;
RMSNorm in fp32, cast back before the weight). The model's own forward runs around the layers
(embeddings, rotary tables, masks including sliding windows, final norm, LM head), so masks and positions
are the model's. The first layer (frozen input, no gradient) and any call without a mask, rotary tables or
an initialised prefix run the layer's own forward. Outside `installed`, and for evaluation and generation,
the layers are untouched.

Not applicable (`unsupported_reason`; the trainer stays eager): other architectures, ZeRO-3-partitioned
parameters, activation checkpointing, attention implementations other than "sdpa" and "eager", other
activations, no C/C++ compiler for Inductor.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

FUSABLE_MODEL_TYPES = ("llama", "mistral", "qwen2")
ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager")


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm: normalised in fp32, cast back to the input dtype, then scaled."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, H_kv, S, D] -> [B, H_kv * groups, S, D], each key/value head serving `groups` query heads."""
    if groups == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, groups, s, d).reshape(b, h * groups, s, d)


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scaling: float) -> torch.Tensor:
    """Attention of q [B, H, T, D] over k, v [B, H_kv, S, D] (prefix + own keys) under the model's mask.

    Short rows (the common prefix-tuning case: tens of keys) take `_grouped_attention`, which keeps its
    [T, S] probabilities for backward; once those would outgrow what `scaled_dot_product_attention`
    keeps (keys and values repeated per head, and the output: D * (2S + T) per head), the fused kernel
    takes over, so memory grows with the sequence as it does in the eager layers, not with its square.
    Under `torch.compile` the test is a guard on the sizes: a graph per side of it."""
    t, s, d = q.shape[-2], k.shape[-2], q.shape[-1]
    if t * s <= d * (2 * s + t):
        return _grouped_attention(q, k, v, mask, scaling)
    groups = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(
        q, _repeat_kv(k, groups), _repeat_kv(v, groups), attn_mask=mask, scale=scaling
    )


def _grouped_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scaling: float
) -> torch.Tensor:
    """softmax(q k^T * scaling + mask) v, each key/value head serving its group of query heads.

    q: [B, H, T, D]; k, v: [B, H_kv, S, D]; mask: [B or 1, 1 or H, T, S], bool (True = attend) or additive
    float. Two batched matmuls over [B, H_kv, groups * T, D] queries, so the keys and values are never
    repeated per query head, and the scale, mask and softmax fuse into the compiled graph around them.
    At prefix-tuning sizes (tens of keys) it replaces `scaled_dot_product_attention`, whose CPU flash
    kernel's backward zero-fills its gradient buffers (timings: benchmarks/README.md). The softmax runs in fp32,
    as the eager attention's does; masked scores are set to the dtype's lowest finite value, not -inf, so
    a row with nothing to attend to (none exists with a prefix: every row sees its prefix) would average
    its values instead of producing NaN.
    """
    b, h, t, d = q.shape
    kv_heads, s = k.shape[1], k.shape[-2]
    groups = h // kv_heads
    scores = torch.matmul(q.reshape(b, kv_heads, groups * t, d), k.transpose(-1, -2))
    scores = scores.view(b, kv_heads, groups, t, s) * scaling
    mask = mask.unsqueeze(2) if mask.shape[1] == 1 else mask.view(mask.shape[0], kv_heads, groups, t, s)
    if mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    else:
        scores = scores + mask
    probs = scores.float().softmax(dim=-1).to(v.dtype)
    return torch.matmul(probs.view(b, kv_heads, groups * t, s), v).view(b, h, t, d)


def decoder_layer(
    hidden: torch.Tensor,
    mask: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    prefix_keys: torch.Tensor,
    prefix_values: torch.Tensor,
    weights: tuple[torch.Tensor | None, ...],
    eps: float,
    heads: int,
    kv_heads: int,
    head_dim: int,
    scaling: float,
) -> torch.Tensor:
    """One pre-norm decoder layer with a prefix: the eager computation that `torch.compile` fuses.

    hidden: [B, T, width]; mask: the model's 4D attention mask over [prefix slots + T] (bool, or
    additive float); cos, sin: [B, T, head_dim]; prefix_keys/values: [B, H_kv, P, head_dim];
    weights: `layer_weights(layer)`.
    """
    (in_norm, q_w, q_b, k_w, k_b, v_w, v_b, o_w, o_b, post_norm, gate_w, gate_b, up_w, up_b, down_w, down_b) = weights
    b, t, _ = hidden.shape
    x = _rms_norm(hidden, in_norm, eps)
    q = F.linear(x, q_w, q_b).view(b, t, heads, head_dim).transpose(1, 2)
    k = F.linear(x, k_w, k_b).view(b, t, kv_heads, head_dim).transpose(1, 2)
    v = F.linear(x, v_w, v_b).view(b, t, kv_heads, head_dim).transpose(1, 2)
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    q = q * c + _rotate_half(q) * s
    k = k * c + _rotate_half(k) * s
    k = torch.cat([prefix_keys, k], dim=-2)
    v = torch.cat([prefix_values, v], dim=-2)
    attn = _attention(q, k, v, mask, scaling)
    hidden = hidden + F.linear(attn.transpose(1, 2).reshape(b, t, heads * head_dim), o_w, o_b)
    x = _rms_norm(hidden, post_norm, eps)
    return hidden + F.linear(F.silu(F.linear(x, gate_w, gate_b)) * F.linear(x, up_w, up_b), down_w, down_b)


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean attention mask (True = attend) as an additive one: 0 where attended, the dtype's lowest
    finite value elsewhere, as the eager attention builds it; an additive mask is returned as it is.

    Why: in the compiled layer's softmax, a boolean mask is read as one byte per score and widened into a
    vector mask for a blend, and its backward needs it again; an added float mask is one load and an add,
    with nothing to keep for backward (timings: `benchmarks/compiled_kernels.py` in benchmarks/README.md).
    Same probabilities: exp of the lowest value minus the row's maximum is 0, as for a filled one."""
    if mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy in fp32: [K, vocab] logits, [K] target ids (no ignore index) -> [K] losses.
    The eager loss; compiled training forwards use `TokenCrossEntropy` (`CompiledLayers.cross_entropy`)."""
    return F.cross_entropy(logits.float(), targets, reduction="none")


class TokenCrossEntropy(torch.autograd.Function):
    """`token_cross_entropy` with its backward written out, for `torch.compile`.

    Forward: logsumexp(logits) - logits[target], in fp32; kept for backward: the logits (as the compiled
    `F.cross_entropy` keeps them), the targets and the [K] logsumexps. Backward: softmax = exp(logits - lse)
    times the incoming gradient, minus it at each row's target: one pass over the [K, vocab] logits.
    Why not the compiled `F.cross_entropy`: the gradient Inductor derives from it (log-softmax backward
    through nll_loss) spends a separate pass summing a one-hot over the whole vocabulary per row (timings:
    `benchmarks/compiled_kernels.py` in benchmarks/README.md).
    The values are the same up to float rounding (the log-softmax subtracts in the other order)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = logits.float()
        lse = torch.logsumexp(x, dim=-1)
        ctx.save_for_backward(logits, targets, lse)
        return lse - x.gather(-1, targets.unsqueeze(-1)).squeeze(-1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        logits, targets, lse = ctx.saved_tensors
        grad_logits = torch.exp(logits.float() - lse.unsqueeze(-1)) * grad.unsqueeze(-1)
        grad_logits.scatter_add_(-1, targets.unsqueeze(-1), -grad.unsqueeze(-1))
        return grad_logits.to(logits.dtype), None


def fused_token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """`TokenCrossEntropy` as a function, what `CompiledLayers` compiles."""
    return TokenCrossEntropy.apply(logits, targets)


def layer_weights(layer: torch.nn.Module) -> tuple[torch.Tensor | None, ...]:
    """The tensors `decoder_layer` takes, in its order (biases None where the layer has none)."""
    attn, mlp = layer.self_attn, layer.mlp
    return (
        layer.input_layernorm.weight,
        attn.q_proj.weight,
        attn.q_proj.bias,
        attn.k_proj.weight,
        attn.k_proj.bias,
        attn.v_proj.weight,
        attn.v_proj.bias,
        attn.o_proj.weight,
        attn.o_proj.bias,
        layer.post_attention_layernorm.weight,
        mlp.gate_proj.weight,
        mlp.gate_proj.bias,
        mlp.up_proj.weight,
        mlp.up_proj.bias,
        mlp.down_proj.weight,
        mlp.down_proj.bias,
    )


def unsupported_reason(model: torch.nn.Module, layers: list[torch.nn.Module]) -> str | None:
    """Why `decoder_layer` cannot stand in for these layers, or None when it can."""
    config = model.config
    model_type = getattr(config, "model_type", None)
    if model_type not in FUSABLE_MODEL_TYPES:
        return f"model_type {model_type!r}: compiled layers exist for {', '.join(FUSABLE_MODEL_TYPES)}"
    implementation = getattr(config, "_attn_implementation", None)
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        return (
            f"attention implementation {implementation!r}: compiled layers accept "
            f"{', '.join(ATTENTION_IMPLEMENTATIONS)}"
        )
    if getattr(config, "hidden_act", None) != "silu":
        return f"hidden_act {config.hidden_act!r}: compiled layers implement 'silu'"
    if getattr(config, "pretraining_tp", 1) not in (None, 1):
        return f"pretraining_tp {config.pretraining_tp}: compiled layers need 1"
    compiler = _missing_compiler(next(model.parameters()).device.type)
    if compiler:
        return compiler
    if any(hasattr(p, "ds_id") for p in model.parameters()):
        return "the parameters are partitioned by DeepSpeed ZeRO-3 (only its module hooks gather them)"
    for layer in layers:
        if getattr(layer, "gradient_checkpointing", False):
            return "activation checkpointing is on (it recomputes through the layers' own forward)"
        needed = ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm")
        if not all(hasattr(layer, name) for name in needed):
            return f"{type(layer).__name__} does not have the pre-norm attention + gated-MLP layout"
    return None


def _missing_compiler(device_type: str) -> str | None:
    """Inductor builds CPU kernels with a C++ compiler, and Triton a C launcher for GPU kernels."""
    if device_type == "cpu":
        found = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
        return None if found else "no C++ compiler (Inductor builds the CPU kernels with one: install g++ or set CXX)"
    found = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc") or shutil.which("clang")
    return None if found else "no C compiler (Triton builds its kernel launchers with one: install gcc or set CC)"


class UnsupportedLayers(ValueError):
    """`decoder_layer` cannot stand in for a model's layers; `reason` says why."""

    def __init__(self, reason: str):
        super().__init__(f"compiled layers: {reason}")
        self.reason = reason


class CompiledLayers:
    """Swaps a model's decoder layers to the compiled `decoder_layer` during training forwards.

    Raises UnsupportedLayers (see `unsupported_reason`) for layers it cannot stand in for."""

    def __init__(self, model: torch.nn.Module, layers: list[torch.nn.Module]):
        reason = unsupported_reason(model, layers)
        if reason is not None:
            raise UnsupportedLayers(reason)
        self.layers = layers
        config = model.config
        attn = layers[0].self_attn
        self.constants = dict(
            eps=float(layers[0].input_layernorm.variance_epsilon),
            heads=int(config.num_attention_heads),
            kv_heads=int(config.num_key_value_heads),
            head_dim=int(attn.head_dim),
            scaling=float(attn.scaling),
        )
        self.function = torch.compile(decoder_layer)
        self.cross_entropy = torch.compile(fused_token_cross_entropy)  # the loss of the same training forwards
        self.calls = 0  # layer calls that ran compiled
        self.eager_calls = 0  # layer calls handed to the layer's own forward (see `_forward`)
        self._masks: tuple[torch.Tensor, torch.Tensor] | None = None  # (model's mask, `additive_mask` of it)

    @contextmanager
    def installed(self, cache: Any) -> Iterator[None]:
        """Within this block the layers run compiled, reading the prefix from `cache` (a PrefixCache)."""
        saved = [layer.__dict__.get("forward") for layer in self.layers]  # a forward set on the instance
        for index, (layer, previous) in enumerate(zip(self.layers, saved)):
            eager = previous or type(layer).forward.__get__(layer)
            layer.forward = self._forward(layer, eager, cache.layers[index])
        try:
            yield
        finally:
            self._masks = None
            for layer, previous in zip(self.layers, saved):
                if previous is None:
                    del layer.forward
                else:
                    layer.forward = previous

    def _forward(self, layer: torch.nn.Module, eager, prefix: Any):
        """The stand-in forward of `layer`: `eager` is what it replaces, `prefix` its cache layer."""
        weights = layer_weights(layer)

        def forward(
            hidden_states,
            attention_mask=None,
            position_ids=None,
            cache=None,
            use_cache=False,
            position_embeddings=None,
            **kwargs,
        ):
            # The eager layer for the first layer, whose input (the embeddings of a frozen model) needs
            # no gradient: compiled, it would be a second graph family (dynamo specialises on
            # requires_grad), doubling the compile time for 1/L of the layers. And for anything the
            # compiled function does not model: no mask (the model decided causal attention needs none),
            # no rotary tables, or no prefix in the cache.
            if (
                not hidden_states.requires_grad
                or not isinstance(attention_mask, torch.Tensor)
                or position_embeddings is None
                or not getattr(prefix, "is_initialized", False)
                or use_cache
            ):
                self.eager_calls += 1
                return eager(
                    hidden_states,
                    attention_mask=attention_mask,
                    position_ids=position_ids,
                    cache=cache,
                    use_cache=use_cache,
                    position_embeddings=position_embeddings,
                    **kwargs,
                )
            self.calls += 1
            cos, sin = position_embeddings
            mask = self._additive(attention_mask, hidden_states.dtype)
            return self.function(hidden_states, mask, cos, sin, prefix.keys, prefix.values, weights, **self.constants)

        return forward

    def _additive(self, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The model's mask as `additive_mask`, converted once per forward: every layer gets the same mask
        object, so the conversion is kept (with that object, so its id cannot be reused) until `installed`
        ends."""
        if self._masks is not None and self._masks[0] is mask:
            return self._masks[1]
        converted = additive_mask(mask, dtype)
        self._masks = (mask, converted)
        return converted
