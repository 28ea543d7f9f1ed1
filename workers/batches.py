"""Rows -> batches: a task's resumable example order, padding, and micro-batches of several tasks' rows.

stream = ExampleStream(len(data.train), seed=0)
batch = collate_causal(data.train[stream.next_indices(8)], pad_id=tok.pad_token_id)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

IGNORE_INDEX = -100  # label value the loss skips: prompt and padding positions


class ExampleStream:
    """Training row indices, a fresh permutation of range(n) each epoch, resumable exactly.

    Epoch e's order is numpy's permutation seeded with (seed, e): it depends on (seed, e, n) only, so a
    resumed run continues with exactly the indices an uninterrupted one would have drawn.
    """

    def __init__(self, n: int, *, seed: int = 0):
        if n < 1:
            raise ValueError(f"ExampleStream needs at least 1 row, got n={n}")
        if seed < 0:
            raise ValueError(f"ExampleStream seed must be >= 0, got {seed}")
        self.n, self.seed = n, seed
        self.epoch, self.position = 0, 0
        self._order: np.ndarray | None = None
        self._order_epoch = -1

    def _permutation(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            self._order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
            self._order_epoch = self.epoch
        return self._order

    def next_indices(self, k: int) -> list[int]:
        """The next k row indices, continuing into the next epoch's permutation when this one runs out."""
        out: list[int] = []
        while len(out) < k:
            take = min(k - len(out), self.n - self.position)
            out.extend(self._permutation()[self.position : self.position + take].tolist())
            self.position += take
            if self.position == self.n:
                self.epoch, self.position = self.epoch + 1, 0
        return out

    @property
    def epochs_completed(self) -> float:
        """Passes over the data so far, fractional: epoch + position / n."""
        return self.epoch + self.position / self.n

    def state_dict(self) -> dict[str, int]:
        return {"n": self.n, "seed": self.seed, "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Continue from `state_dict()`'s point; ValueError if it was for other data or another seed."""
        if (state["n"], state["seed"]) != (self.n, self.seed):
            raise ValueError(
                f"ExampleStream state is for n={state['n']}, seed={state['seed']}, "
                f"this stream has n={self.n}, seed={self.seed}: the data or the seed changed"
            )
        if not 0 <= state["position"] < self.n or state["epoch"] < 0:
            raise ValueError(f"ExampleStream state out of range: {dict(state)}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


Rows = Sequence[Mapping[str, Sequence[int]]] | Mapping[str, Sequence[Sequence[int]]]


def collate_causal(rows: Rows, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad causal-LM training rows into one batch.

    rows: rows with `input_ids` and `labels` (`[ds[i] for i in idx]`) or the columns `ds[idx]` returns.
    Returns input_ids [B, T] long (pad_id after each row's end), attention_mask [B, T] long (1 real token,
    0 padding), labels [B, T] long (IGNORE_INDEX on prompt and padding); T is the longest row.
    """
    return _collate_training(rows, pad_id)


def collate_seq2seq(rows: Rows, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad encoder-decoder training rows into one batch.

    Returns input_ids [B, S] long, attention_mask [B, S] long (encoder side), labels [B, L] long
    (IGNORE_INDEX on padding); the model builds decoder inputs by shifting labels right.
    """
    return _collate_training(rows, pad_id)


def _collate_training(rows: Rows, pad_id: int) -> dict[str, torch.Tensor]:
    input_ids, labels = _columns(rows, "input_ids", "labels")
    ids, mask = _pad(input_ids, pad_id, "right")
    return {"input_ids": ids, "attention_mask": mask, "labels": _pad(labels, IGNORE_INDEX, "right")[0]}


def collate_prompts_left(prompt_id_lists: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-pad decoder-only generation prompts, so every row's next token comes at the same place.

    Returns input_ids [B, T] long (pad_id before each prompt) and attention_mask [B, T] long (0 on pads).
    """
    ids, mask = _pad(prompt_id_lists, pad_id, "left")
    return {"input_ids": ids, "attention_mask": mask}


def collate_prompts_right(prompt_id_lists: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad encoder inputs for seq2seq generation (left padding would shift absolute positions).

    Returns input_ids [B, S] long and attention_mask [B, S] long (0 on pads).
    """
    ids, mask = _pad(prompt_id_lists, pad_id, "right")
    return {"input_ids": ids, "attention_mask": mask}


def _columns(rows: Rows, *names: str) -> list[list]:
    if isinstance(rows, Mapping):
        return [list(rows[n]) for n in names]
    return [[r[n] for r in rows] for n in names]


def _pad(seqs: Sequence[Sequence[int]], value: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T] long tensor of the sequences padded with `value`, and the [B, T] long 1/0 mask of real tokens."""
    if len(seqs) == 0:
        raise ValueError("cannot collate an empty batch")
    width = max(len(x) for x in seqs)
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, seq in enumerate(seqs):
        n = len(seq)
        if n == 0:
            continue
        cols = slice(0, n) if side == "right" else slice(width - n, width)
        out[i, cols] = torch.as_tensor(seq, dtype=torch.long)
        mask[i, cols] = 1
    return out, mask


PADDING_WASTE = 0.25  # a micro-batch is cut before padding would exceed this share of its real tokens


def micro_batch_groups(order: list[int], size: int, lengths: list[int] | None = None) -> list[list[int]]:
    """`order` (row indices) cut into consecutive micro-batches of at most `size` rows.

    With `lengths` (the rows' lengths, in `order`'s order, ascending), a micro-batch is also cut where the
    next row would make padding more than PADDING_WASTE of it: short rows beside long ones then do not pay
    for the long rows' padding. The cuts depend on `order` and `lengths` only, so every rank of a group
    computes the same ones (under ZeRO-3 each forward gathers the base weights collectively: ranks must
    run in lockstep).

        micro_batch_groups([0, 1, 2], 2) == [[0, 1], [2]]
    """
    groups: list[list[int]] = []
    real = 0
    for k, i in enumerate(order):
        if (
            groups
            and len(groups[-1]) < size
            and not (lengths and lengths[k] * (len(groups[-1]) + 1) > (1 + PADDING_WASTE) * (real + lengths[k]))
        ):
            groups[-1].append(i)
            real += lengths[k] if lengths else 0
        else:
            groups.append([i])
            real = lengths[k] if lengths else 0
    return groups


def rank_share(group: list[int], rank: int, world: int) -> tuple[list[int], float]:
    """This rank's rows of a micro-batch of the whole group, with weight 1; (a row, weight 0) when the share
    is empty: the zero-weight row keeps the rank in lockstep without changing any gradient or count."""
    share = group[rank::world]
    return (share, 1.0) if share else ([group[0]], 0.0)


def mixed_forward(prefixed: Any, prefix_of: Callable[[int], torch.Tensor], rows: Rows, owners: list[int], pad_id: int):
    """One forward over rows of several tasks, each row with its own task's prefix, losses at targets only.

    prefixed: the `workers.inject.PrefixedModel`; rows: tokenized rows (`input_ids`, `labels`); owners[i]:
    the task index of row i; prefix_of(j): task j's encoded prefix [P_j, 2L*H*D] (called once per task
    present). Returns (PrefixedOutput, row_tasks [B] long: owners on the model's device, attention_mask
    [B, T] long).
    """
    collate = collate_seq2seq if prefixed.seq2seq else collate_causal
    batch = {k: v.to(prefixed.device) for k, v in collate(rows, pad_id).items()}
    row_tasks = torch.tensor(owners, device=prefixed.device)
    used = sorted(set(owners))
    local = torch.full((used[-1] + 1,), -1, dtype=torch.long, device=prefixed.device)
    local[used] = torch.arange(len(used), device=prefixed.device)
    out = prefixed.forward(
        [prefix_of(j) for j in used],
        local[row_tasks],
        batch["input_ids"],
        batch["attention_mask"],
        batch["labels"],
        logits="targets",
    )
    return out, row_tasks, batch["attention_mask"]
