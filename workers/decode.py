"""Continuous batching over any mix of prefixes: rows join the running batch between decoding steps and
leave when done, each with its own prefix, sampling settings and key/value cache.

    batcher = ContinuousBatcher(PrefixedModel(model))
    row = Row(prefix=prefix, prompt_ids=[2, 17, 9], sampling=Sampling(max_tokens=8, temperature=0.0))
    first = batcher.add([row])          # prefill: each new row's first token
    while batcher.rows:
        tokens = batcher.step()         # one decoding step for every running row: [(row, token id)]
        batcher.remove([r for r, _ in tokens if r.done])

Layout (decoder-only models). Each row's cache holds, per layer, keys and values [H_kv, S_row, D]: the row's
prefix first (P_row slots, never rotated, as in training), then its prompt, then what it generated. The
running batch keeps all rows' caches left-padded to one length S: k, v [B, H_kv, S, D] and a mask [B, S]
(0 on padding). A decoding step feeds one token per row at position P_row + t (the count of the row's real
slots), which is the position the row gets alone; padding is masked, so every row's logits are the ones it
gets decoded alone, up to float rounding. The rows joining at a step are prefilled together, laid out as
generate() lays out a mixed-prefix batch, then their caches are padded into the batch; rows that leave
are dropped and the columns that only held padding are cut.

Greedy rows (temperature 0) take the argmax; others sample from softmax(logits / temperature) restricted
to the top_p nucleus, with the row's own torch.Generator (seeded: the same seed gives the same tokens).
A row is done at eos (not kept in its tokens) or after max_tokens; anything else (stop strings, timeouts,
cancelled clients) is the caller's `remove`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache

from workers.inject import PrefixedModel, generation_cache, layer_key_values, pack_prefixes


@dataclass(frozen=True, kw_only=True)
class Sampling:
    """How one row picks its tokens."""

    max_tokens: int = 16
    """Most new tokens (eos not counted)."""
    temperature: float = 1.0
    """0: greedy (argmax); else softmax(logits / temperature)."""
    top_p: float = 1.0
    """Nucleus: sample among the most likely tokens whose probabilities sum to at least top_p."""
    seed: int | None = None
    """Seed of the row's generator; None: a random one."""


@dataclass(eq=False, kw_only=True)
class Row:
    """One sequence being decoded. prefix: [P, 2L*H*D] (None: the bare base model); prompt_ids: token ids."""

    prefix: torch.Tensor | None
    prompt_ids: list[int]
    sampling: Sampling = field(default_factory=Sampling)
    tokens: list[int] = field(default_factory=list)
    """New tokens so far (eos excluded)."""
    finish_reason: str | None = None
    """None while running; 'stop' (eos), 'length' (max_tokens), or what the caller set."""
    generator: torch.Generator | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


class ContinuousBatcher:
    """Runs any number of rows of one decoder-only base model, one forward per decoding step."""

    def __init__(self, prefixed: PrefixedModel, *, eos_token_id: int | None = None):
        if prefixed.seq2seq:
            raise ValueError(
                f"model_type {prefixed.arch.model_type!r}: continuous batching serves decoder-only models; "
                "encoder-decoders are served by `prefixd generate` and the pyfunc model"
            )
        self.prefixed = prefixed
        self.eos_token_id = eos_token_id
        self.rows: list[Row] = []
        self._cache: list[tuple[torch.Tensor, torch.Tensor]] = []  # per layer: k, v [B, H, S, D]
        self._mask: torch.Tensor | None = None  # [B, S] long
        self._last: torch.Tensor | None = None  # [B] the token each row feeds next

    # ------------------------------------------------------------------------------------------ joining
    @torch.no_grad()
    def add(self, rows: Sequence[Row]) -> list[tuple[Row, int | None]]:
        """Prefill the new rows (one forward for all of them) and put them into the running batch; returns
        (row, first token, or None when the row ended at once on eos). Rows done at once are not kept."""
        rows = list(rows)
        if not rows:
            return []
        k_v, mask, tokens = self._prefill(rows)
        keep = [i for i, row in enumerate(rows) if not row.done]
        if keep:
            index = torch.tensor(keep, device=mask.device)
            self._join(
                [rows[i] for i in keep],
                [(k.index_select(0, index), v.index_select(0, index)) for k, v in k_v],
                mask.index_select(0, index),
                [tokens[i] for i in keep],
            )
        return list(zip(rows, tokens))

    def _prefill(self, rows: list[Row]):
        """One forward over the new rows, laid out as generate() lays out a mixed-prefix batch: per row
        [unused prefix slots (0), its prefix (1), left padding (0), its prompt (1)], positions P_row + t."""
        device, shape = self.prefixed.device, self.prefixed.shape
        for row in rows:
            if row.sampling.temperature > 0 and row.generator is None:
                row.generator = torch.Generator(device=device)
                if row.sampling.seed is None:
                    row.generator.seed()
                else:
                    row.generator.manual_seed(row.sampling.seed)
        t = max(len(row.prompt_ids) for row in rows)
        ids = torch.zeros((len(rows), t), dtype=torch.long, device=device)
        token_mask = torch.zeros((len(rows), t), dtype=torch.long, device=device)
        for i, row in enumerate(rows):
            ids[i, t - len(row.prompt_ids) :] = torch.tensor(row.prompt_ids, device=device)
            token_mask[i, t - len(row.prompt_ids) :] = 1
        if all(row.prefix is None for row in rows):
            cache, prefix_mask = DynamicCache(), token_mask[:, :0]
        else:
            width = shape.num_layers * 2 * shape.token_dim
            prefixes = [
                row.prefix.to(device) if row.prefix is not None else torch.zeros((0, width), device=device)
                for row in rows
            ]
            packed = pack_prefixes(prefixes, torch.arange(len(rows), device=device), dtype=self.prefixed.dtype)
            cache = generation_cache(layer_key_values(packed.flat, shape), seq2seq=False)
            prefix_mask = packed.mask
        mask = torch.cat([prefix_mask, token_mask], dim=1)  # [B, Pmax + T]
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -t:]
        logits = self.prefixed.model(
            input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True
        ).logits[:, -1]  # [B, vocab]
        tokens = [self._record(row, token) for row, token in zip(rows, self._pick(rows, logits))]
        return [(layer.keys, layer.values) for layer in cache.layers], mask, tokens

    def _join(self, rows: list[Row], k_v, mask: torch.Tensor, tokens: list[int]) -> None:
        last = torch.tensor(tokens, dtype=torch.long, device=mask.device)
        if not self.rows:
            self.rows, self._cache, self._mask, self._last = rows, k_v, mask, last
            return
        s_old, s_new = self._mask.shape[1], mask.shape[1]
        width = max(s_old, s_new)
        # left-pad both to one length: the padding is masked, positions come from each row's own count
        self._cache = [
            (
                torch.cat([F.pad(k0, (0, 0, width - s_old, 0)), F.pad(k1, (0, 0, width - s_new, 0))]),
                torch.cat([F.pad(v0, (0, 0, width - s_old, 0)), F.pad(v1, (0, 0, width - s_new, 0))]),
            )
            for (k0, v0), (k1, v1) in zip(self._cache, k_v)
        ]
        self._mask = torch.cat([F.pad(self._mask, (width - s_old, 0)), F.pad(mask, (width - s_new, 0))])
        self._last = torch.cat([self._last, last])
        self.rows.extend(rows)

    # ------------------------------------------------------------------------------------------ decoding
    @torch.no_grad()
    def step(self) -> list[tuple[Row, int | None]]:
        """One decoding step of every running row: (row, new token, or None when the row ended on eos).
        Rows that finish stay in the batch until `remove`d."""
        if not self.rows:
            return []
        mask = F.pad(self._mask, (0, 1), value=1)  # [B, S + 1]
        positions = (mask.sum(dim=1, keepdim=True) - 1).to(torch.long)  # [B, 1]: P_row + t
        cache = DynamicCache(self._cache)
        logits = self.prefixed.model(
            input_ids=self._last.unsqueeze(1), attention_mask=mask, position_ids=positions, cache=cache, use_cache=True
        ).logits[:, -1]  # [B, vocab]
        self._cache = [(layer.keys, layer.values) for layer in cache.layers]
        self._mask = mask
        picked = self._pick(self.rows, logits)
        out = []
        for row, token in zip(self.rows, picked):
            out.append((row, self._record(row, token) if not row.done else None))
        self._last = torch.tensor(picked, dtype=torch.long, device=mask.device)
        return out

    def remove(self, rows: Sequence[Row]) -> None:
        """Drop rows from the batch (finished, cancelled or timed out); unknown rows are ignored."""
        gone = {id(r) for r in rows}
        keep = [i for i, r in enumerate(self.rows) if id(r) not in gone]
        if len(keep) == len(self.rows):
            return
        if not keep:
            self.rows, self._cache, self._mask, self._last = [], [], None, None
            return
        index = torch.tensor(keep, dtype=torch.long, device=self._mask.device)
        mask = self._mask.index_select(0, index)
        first = int((mask.sum(dim=0) > 0).nonzero()[0])  # columns before it are padding in every row
        self._mask = mask[:, first:]
        self._cache = [
            (k.index_select(0, index)[:, :, first:], v.index_select(0, index)[:, :, first:]) for k, v in self._cache
        ]
        self._last = self._last.index_select(0, index)
        self.rows = [self.rows[i] for i in keep]

    # ------------------------------------------------------------------------------------------ sampling
    def _pick(self, rows: Sequence[Row], logits: torch.Tensor) -> list[int]:
        """One token per row from logits [B, vocab]."""
        greedy = logits.argmax(dim=-1).tolist()
        out = []
        for i, row in enumerate(rows):
            s = row.sampling
            if s.temperature <= 0:
                out.append(greedy[i])
                continue
            probs = torch.softmax(logits[i].float() / s.temperature, dim=-1)
            if s.top_p < 1.0:
                sorted_p, order = probs.sort(descending=True)
                # keep a token while the mass before it is below top_p (the most likely one always stays)
                outside = (sorted_p.cumsum(-1) - sorted_p) >= s.top_p
                sorted_p = sorted_p.masked_fill(outside, 0.0)
                probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
            out.append(int(torch.multinomial(probs, 1, generator=row.generator)))
        return out

    def _record(self, row: Row, token: int) -> int | None:
        if self.eos_token_id is not None and token == self.eos_token_id:
            row.finish_reason = "stop"
            return None
        row.tokens.append(token)
        if len(row.tokens) >= row.sampling.max_tokens:
            row.finish_reason = "length"
        return token
