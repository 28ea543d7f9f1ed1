"""Prefixes into a frozen Hugging Face model: forward, loss and generate, each row with its own prefix.

How a batch carries several prefixes (lengths P_j, Pmax the longest):
- Each row's prefix is right-aligned in a shared region of Pmax slots; the unused slots on the left are
  masked. The key/value cache handed to the model holds, per layer, k and v shaped [B, H_kv, Pmax, D].
- The attention mask is [prefix slots (Pmax)] + [the row's own mask (T)], and every row gets positions
  P_row + t, which is what it gets when run alone (PEFT's positions). Architectures whose decoder takes
  positions from the cache length (BART) run one sub-batch per prefix length instead (see arch.py).
- For training, the cache is read-only: each attention layer gets cat(prefix, new) and nothing is
  stored, so a fresh forward never sees a stale cache and gradient checkpointing's recompute sees the
  same keys as the first pass (the layers are told they may keep the cache under checkpointing).
- For generation, the prefix fills an ordinary `DynamicCache`, which generate() grows token by token.

The prefix layout is PEFT's: a flat [P, num_layers * 2 * H_kv * D] vector viewed as
[P, 2L, H_kv, D]; decoder-only layer l takes chunks (2l, 2l+1). Encoder-decoders (PEFT duplicates the
stack and splits by 4) give decoder layer l the chunks (4l mod 2L, 4l+1 mod 2L) for its self-attention;
the encoder and cross-attention see no prefix.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, EncoderDecoderCache

from workers.arch import PrefixShape, arch_of, decoder_layers, prefix_shape
from workers.fused import CompiledLayers, UnsupportedLayers, token_cross_entropy


class PrefixShapeError(ValueError):
    """A prefix tensor whose shape does not fit the model."""


# --------------------------------------------------------------------------------------------------
# Packing prefixes into per-layer keys and values


@dataclass(frozen=True)
class PackedPrefixes:
    """Prefixes of a batch, right-aligned in Pmax slots.

    flat: [B, Pmax, 2L*H*D] in the model's dtype; mask: [B, Pmax] long (1 = a real prefix slot);
    lengths: [B] long, each row's own prefix length.
    """

    flat: torch.Tensor
    mask: torch.Tensor
    lengths: torch.Tensor


def pack_prefixes(prefixes: Sequence[torch.Tensor], rows: torch.Tensor, *, dtype: torch.dtype) -> PackedPrefixes:
    """Give row b the prefix prefixes[rows[b]].

    prefixes: J tensors [P_j, F] (the encoders' outputs, fp32, with autograd); rows: [B] long in 0..J-1.
    The gather keeps the graph, so each prefix's gradient is the sum over its rows.
    """
    widths = {p.shape[-1] for p in prefixes}
    if len(widths) != 1:
        raise PrefixShapeError(f"prefixes of one batch must have one width; got widths {sorted(widths)}")
    lengths = torch.tensor([p.shape[0] for p in prefixes], device=rows.device)
    pmax = int(lengths.max())
    padded = torch.stack([F.pad(p, (0, 0, pmax - p.shape[0], 0)) for p in prefixes])  # [J, Pmax, F]
    flat = padded[rows].to(dtype)  # [B, Pmax, F]
    slot = torch.arange(pmax, device=rows.device)
    row_lengths = lengths[rows]
    mask = (slot.unsqueeze(0) >= (pmax - row_lengths).unsqueeze(1)).long()  # [B, Pmax]
    return PackedPrefixes(flat=flat, mask=mask, lengths=row_lengths)


def layer_key_values(flat: torch.Tensor, shape: PrefixShape) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Split a flat [B, P, 2L*H*D] prefix into L pairs (k, v), each [B, H, P, D] (PEFT's layout)."""
    b, p, width = flat.shape
    expected = shape.num_layers * 2 * shape.token_dim
    if width != expected:
        raise PrefixShapeError(
            f"prefix width {width} does not fit the model: expected num_layers*2*token_dim = "
            f"{shape.num_layers}*2*{shape.token_dim} = {expected}"
        )
    two_l = 2 * shape.num_layers
    stacked = flat.view(b, p, two_l, shape.num_kv_heads, shape.head_dim).permute(2, 0, 3, 1, 4)  # [2L, B, H, P, D]
    # unbind, not 2L indexings: each index's backward would zero-fill and add a tensor of every layer's prefix
    parts = stacked.unbind(0)
    if shape.num_transformer_submodules == 1:
        return [(parts[2 * i], parts[2 * i + 1]) for i in range(shape.num_layers)]
    return [(parts[(4 * i) % two_l], parts[(4 * i + 1) % two_l]) for i in range(shape.num_layers)]


# --------------------------------------------------------------------------------------------------
# Caches


class _ReadOnlyLayer(DynamicLayer):
    """A cache layer holding a fixed prefix: update() returns cat(prefix, new) and stores nothing."""

    def __init__(self, keys: torch.Tensor | None = None, values: torch.Tensor | None = None):
        super().__init__()
        if keys is not None:
            self.keys, self.values = keys, values
            self.device = keys.device
            self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            return key_states, value_states
        return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)


class PrefixCache(Cache):
    """Read-only per-layer prefixes for one forward pass (training and scoring)."""

    def __init__(self, key_values: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None, num_layers: int = 0):
        layers = (
            [_ReadOnlyLayer(k, v) for k, v in key_values]
            if key_values
            else [_ReadOnlyLayer() for _ in range(num_layers)]
        )
        super().__init__(layers=layers)


class _NeverUpdated(dict):
    """`is_updated` for a cross-attention cache that stores nothing: every layer recomputes its keys."""

    def __setitem__(self, key, value):
        super().__setitem__(key, False)


class PrefixEncoderDecoderCache(EncoderDecoderCache):
    """Read-only prefix for decoder self-attention; cross-attention computed afresh, never stored."""

    def __init__(self, key_values: Sequence[tuple[torch.Tensor, torch.Tensor]]):
        super().__init__(PrefixCache(key_values), PrefixCache(num_layers=len(key_values)))
        self.is_updated = _NeverUpdated((i, False) for i in range(len(key_values)))


def training_cache(key_values, *, seq2seq: bool) -> Cache:
    return PrefixEncoderDecoderCache(key_values) if seq2seq else PrefixCache(key_values)


def generation_cache(key_values, *, seq2seq: bool) -> Cache:
    """A fresh, growable cache pre-filled with the prefix (generate() appends to it)."""
    self_cache = DynamicCache([(k.detach(), v.detach()) for k, v in key_values])
    return EncoderDecoderCache(self_cache, DynamicCache()) if seq2seq else self_cache


# --------------------------------------------------------------------------------------------------
# The model


@dataclass(frozen=True)
class PrefixedOutput:
    """logits: [B, T, vocab] (causal: at input positions; seq2seq: at decoder positions); with
        `logits="targets"` (causal) [K, vocab]: only at the K target positions, row by row, in the order of
        `target_mask.nonzero()`.
    token_loss: [B, T] cross-entropy of each target token, 0 where not a target.
    target_mask: [B, T] bool, the tokens that count."""

    logits: torch.Tensor
    token_loss: torch.Tensor
    target_mask: torch.Tensor

    def row_loss_sums(self) -> torch.Tensor:
        """[B]: summed target-token loss per row."""
        return self.token_loss.sum(dim=1)

    def row_token_counts(self) -> torch.Tensor:
        """[B]: target tokens per row."""
        return self.target_mask.sum(dim=1)


class PrefixedModel:
    """A frozen base model that runs batches in which each row carries its own prefix.

    The base model's parameters are set to requires_grad=False and never change; prefixes are passed
    per call, so any number of tasks can share this one object.
    """

    def __init__(self, model: torch.nn.Module, device: torch.device | None = None):
        """device: where batches and prefixes go; default the device of the model's first parameter (give it
        for a ZeRO-3 model, whose parameters are empty placeholders between its gathers)."""
        self.model = model
        self._device = torch.device(device) if device is not None else None
        self.arch = arch_of(model.config)
        self.shape = prefix_shape(model.config)
        self.seq2seq = self.shape.num_transformer_submodules == 2
        for p in model.parameters():
            p.requires_grad_(False)
        self._active_cache: Cache | None = None  # the prefix cache of the forward in progress
        self._hooks: list = []
        self.compiled: CompiledLayers | None = None

    def compile_layers(self) -> str | None:
        """Run the decoder layers compiled (`workers/fused.py`) in training forwards, where supported.

        Returns None when they now do, else the reason they cannot (the eager path stays in use).
        Evaluation and generation are unaffected: only forwards with autograd on are compiled."""
        if self.seq2seq:
            return f"{self.arch.model_type} is an encoder-decoder; compiled layers exist for decoder-only models"
        try:
            self.compiled = CompiledLayers(self.model, decoder_layers(self.model))
        except UnsupportedLayers as e:
            return e.reason
        return None

    def _compiled_now(self) -> CompiledLayers | None:
        """The compiled layers and loss, for a forward with autograd on; None otherwise (eager)."""
        return self.compiled if torch.is_grad_enabled() else None

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return self._device or next(self.model.parameters()).device

    def enable_checkpointing(self) -> None:
        """Recompute activations in backward. PEFT refuses this with prefixes; here the read-only
        prefix cache makes it exact, so the decoder layers may keep the cache under checkpointing.

        Non-reentrant checkpointing only: the prefix reaches the layers through the cache, not as an
        input of the checkpointed function, and reentrant checkpointing would back-propagate through the
        shared prefix graph once per layer ("backward through the graph a second time")."""
        self.compiled = None  # recomputation runs the layers' own forward
        self.model.activation_checkpointing_enable({"use_reentrant": False})
        index = self.arch.cache_arg_dropped_when_checkpointing
        for layer in decoder_layers(self.model):
            layer._can_checkpoint_with_cache = True
            if index is not None:
                self._hooks.append(layer.register_forward_pre_hook(self._restore_cache_hook(index)))

    def _restore_cache_hook(self, index: int):
        def hook(module, args):
            if len(args) > index and args[index] is None and self._active_cache is not None:
                return args[:index] + (self._active_cache,) + args[index + 1 :]
            return None

        return hook

    def disable_checkpointing(self) -> None:
        self.model.activation_checkpointing_disable()
        for layer in decoder_layers(self.model):
            layer._can_checkpoint_with_cache = False
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    # ---------------------------------------------------------------- forward
    def forward(
        self,
        prefixes: Sequence[torch.Tensor],
        rows: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor | None = None,
        *,
        logits: str = "all",
    ) -> PrefixedOutput:
        """One forward of a mixed-prefix batch.

        prefixes: J tensors [P_j, 2L*H*D]; rows: [B] prefix index per row;
        input_ids, attention_mask: [B, T], right-padded (causal LM: prompt+target; seq2seq: encoder input);
        labels: causal LM [B, T] aligned with input_ids, -100 where not a target (shifted here);
                seq2seq [B, T_dec], the decoder targets, -100 on padding.
        logits: "all", or "targets" (causal LM with labels; training): the LM head, its log-softmax and the
                logits' memory cover target positions only, with the same losses and gradients (what it
                saves: benchmarks/README.md). Seq2seq models always compute all decoder positions, which
                are all targets but padding.
        """
        if logits not in ("all", "targets"):
            raise ValueError(f"logits={logits!r}; accepted: 'all', 'targets'")
        targets_only = logits == "targets" and labels is not None and not self.seq2seq
        if self.arch.positions == "from_cache" and len({p.shape[0] for p in prefixes}) > 1:
            return self._forward_by_length(prefixes, rows, input_ids, attention_mask, labels)
        packed = pack_prefixes(prefixes, rows, dtype=self.dtype)
        kv = layer_key_values(packed.flat, self.shape)
        cache = training_cache(kv, seq2seq=self.seq2seq)
        self._active_cache = cache
        try:
            compiled = self._compiled_now()
            if compiled is not None:
                with compiled.installed(cache):
                    return self._forward_with_cache(cache, packed, input_ids, attention_mask, labels, targets_only)
            return self._forward_with_cache(cache, packed, input_ids, attention_mask, labels, targets_only)
        finally:
            self._active_cache = None

    def _forward_with_cache(
        self, cache, packed, input_ids, attention_mask, labels, targets_only: bool = False
    ) -> PrefixedOutput:
        if self.seq2seq:
            if labels is None:
                raise ValueError("labels: required for an encoder-decoder forward (they define the decoder input)")
            decoder_input_ids = self.model.prepare_decoder_input_ids_from_labels(labels=labels)
            decoder_mask = torch.cat([packed.mask, torch.ones_like(decoder_input_ids)], dim=1)
            out = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                decoder_input_ids=decoder_input_ids,
                decoder_attention_mask=decoder_mask,
                cache=cache,
                use_cache=False,
            )
            logits = out.logits
            targets = labels
        else:
            positions = packed.lengths.unsqueeze(1) + (attention_mask.cumsum(-1) - 1).clamp(min=0)
            targets = F.pad(labels[:, 1:], (0, 1), value=-100) if labels is not None else None
            # a boolean [B, T] logits_to_keep makes the model return [K, vocab] at the True positions
            keep = {"logits_to_keep": targets != -100} if targets_only else {}
            out = self.model(
                input_ids=input_ids,
                attention_mask=torch.cat([packed.mask, attention_mask], dim=1),
                position_ids=positions,
                cache=cache,
                use_cache=False,
                **keep,
            )
            logits = out.logits
        if targets is None:
            empty = torch.zeros(logits.shape[:2], device=logits.device)
            return PrefixedOutput(logits=logits, token_loss=empty, target_mask=empty.bool())
        target_mask = targets != -100
        at_targets = logits if targets_only else logits[target_mask]  # [K, vocab] either way
        compiled = self._compiled_now()
        cross_entropy = compiled.cross_entropy if compiled is not None else token_cross_entropy
        loss = cross_entropy(at_targets, targets[target_mask])
        token_loss = loss.new_zeros(targets.shape).masked_scatter(target_mask, loss)
        return PrefixedOutput(logits=logits, token_loss=token_loss, target_mask=target_mask)

    def _forward_by_length(self, prefixes, rows, input_ids, attention_mask, labels) -> PrefixedOutput:
        """One sub-batch per prefix length, reassembled in row order (for models that take positions
        from the cache length)."""
        lengths = torch.tensor([p.shape[0] for p in prefixes], device=rows.device)[rows]
        parts = []
        for length in lengths.unique().tolist():
            idx = (lengths == length).nonzero().squeeze(1)
            used = sorted(set(rows[idx].tolist()))
            remap = torch.full((len(prefixes),), -1, dtype=torch.long, device=rows.device)
            remap[used] = torch.arange(len(used), device=rows.device)
            out = self.forward(
                [prefixes[j] for j in used],
                remap[rows[idx]],
                input_ids[idx],
                attention_mask[idx],
                labels[idx] if labels is not None else None,
            )
            parts.append((idx, out))
        b = rows.shape[0]
        first = parts[0][1]
        logits = first.logits.new_zeros((b,) + first.logits.shape[1:])
        token_loss = first.token_loss.new_zeros((b,) + first.token_loss.shape[1:])
        target_mask = first.target_mask.new_zeros((b,) + first.target_mask.shape[1:])
        for idx, out in parts:
            logits = logits.index_copy(0, idx, out.logits)
            token_loss = token_loss.index_copy(0, idx, out.token_loss)
            target_mask = target_mask.index_copy(0, idx, out.target_mask)
        return PrefixedOutput(logits=logits, token_loss=token_loss, target_mask=target_mask)

    # ---------------------------------------------------------------- generate
    @torch.no_grad()
    def generate(
        self,
        prefixes: Sequence[torch.Tensor] | None,
        rows: torch.Tensor | None,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        **generate_kwargs,
    ) -> torch.Tensor:
        """generate() with each row's prefix applied; prefixes=None generates with the bare model.

        input_ids, attention_mask: [B, T], LEFT-padded for causal LMs. Returns the new tokens only,
        [B, max_new] (padded with the pad token, or eos when the model has none).
        Any generate() option works (greedy, sampling, beams); beams and num_return_sequences
        repeat each row's prefix.
        """
        if prefixes is None:
            out = self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **generate_kwargs)
            return out if self.seq2seq else out[:, input_ids.shape[1] :]
        if self.arch.positions == "from_cache" and len({p.shape[0] for p in prefixes}) > 1:
            return self._generate_by_length(prefixes, rows, input_ids, attention_mask, **generate_kwargs)
        expand = max(generate_kwargs.get("num_beams", 1), 1) * max(generate_kwargs.get("num_return_sequences", 1), 1)
        rows_expanded = rows.repeat_interleave(expand)
        packed = pack_prefixes(prefixes, rows_expanded, dtype=self.dtype)
        cache = generation_cache(layer_key_values(packed.flat, self.shape), seq2seq=self.seq2seq)
        prefix_mask = packed.mask[::expand]
        if self.seq2seq:
            start = torch.ones((input_ids.shape[0], 1), dtype=torch.long, device=input_ids.device)
            generate_kwargs.setdefault("decoder_attention_mask", torch.cat([prefix_mask, start], dim=1))
            return self.model.generate(
                input_ids=input_ids, attention_mask=attention_mask, cache=cache, **generate_kwargs
            )
        out = self.model.generate(
            input_ids=input_ids,
            attention_mask=torch.cat([prefix_mask, attention_mask], dim=1),
            cache=cache,
            **generate_kwargs,
        )
        return out[:, input_ids.shape[1] :]

    def _generate_by_length(self, prefixes, rows, input_ids, attention_mask, **generate_kwargs):
        lengths = torch.tensor([p.shape[0] for p in prefixes], device=rows.device)[rows]
        expand = max(generate_kwargs.get("num_return_sequences", 1), 1)
        pad = self.model.generation_config.pad_token_id
        if pad is None:
            pad = self.model.config.pad_token_id or 0
        results: dict[int, torch.Tensor] = {}
        for length in lengths.unique().tolist():
            idx = (lengths == length).nonzero().squeeze(1)
            used = sorted(set(rows[idx].tolist()))
            remap = {j: i for i, j in enumerate(used)}
            sub_rows = torch.tensor([remap[j] for j in rows[idx].tolist()], device=rows.device)
            out = self.generate(
                [prefixes[j] for j in used], sub_rows, input_ids[idx], attention_mask[idx], **generate_kwargs
            )
            for k, i in enumerate(idx.tolist()):
                results[i] = out[k * expand : (k + 1) * expand]
        width = max(t.shape[1] for t in results.values())
        return torch.cat([F.pad(results[i], (0, width - results[i].shape[1]), value=pad) for i in range(len(results))])
