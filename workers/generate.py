"""Text in, text out, for any mix of prefixes in one batch: used by evaluation, `prefixd generate` and
the MLflow pyfunc model alike, so all three decode the same way.

Prompts are tokenized exactly as training prompts are (`workers/data.py`): a causal LM's prompt gets
the tokenizer's BOS only when the tokenizer adds one itself, and no other special tokens; an
encoder-decoder's prompt gets the tokenizer's own special tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from workers.batches import collate_prompts_left, collate_prompts_right
from workers.inject import PrefixedModel
from workers.tokenizing import leading_bos


def encode_prompt(tokenizer: Any, text: str, *, seq2seq: bool) -> list[int]:
    """Token ids of a generation prompt, as the training data tokenizes prompts."""
    if seq2seq:
        return tokenizer(text, add_special_tokens=True)["input_ids"]
    return leading_bos(tokenizer) + tokenizer(text, add_special_tokens=False)["input_ids"]


def generate_texts(
    prefixed: PrefixedModel,
    tokenizer: Any,
    prefixes: Sequence[torch.Tensor] | None,
    owners: Sequence[int] | None,
    prompts: Sequence[Sequence[int] | str],
    *,
    max_new_tokens: int = 32,
    batch_size: int = 16,
    **generate_kwargs: Any,
) -> list[str]:
    """Decode each prompt with prefix prefixes[owners[i]] (prefixes=None: the bare base model).

    prompts: texts, or token-id lists from `encode_prompt` / the data's `prompt_ids`. Greedy unless
    generate_kwargs say otherwise. Returns the new text of each row, cut at the first eos, stripped.
    """
    seq2seq = prefixed.seq2seq
    ids = [encode_prompt(tokenizer, p, seq2seq=seq2seq) if isinstance(p, str) else list(p) for p in prompts]
    collate = collate_prompts_right if seq2seq else collate_prompts_left
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = tokenizer.eos_token_id
    generate_kwargs.setdefault("do_sample", False)
    if prefixes is not None:  # prefixes loaded elsewhere (a registry download is on the CPU) join the model
        prefixes = [p.to(prefixed.device) for p in prefixes]
    texts: list[str] = []
    for lo in range(0, len(ids), batch_size):
        batch = {k: v.to(prefixed.device) for k, v in collate(ids[lo : lo + batch_size], pad).items()}
        rows = torch.tensor(owners[lo : lo + batch_size], device=prefixed.device) if prefixes is not None else None
        new = prefixed.generate(
            prefixes,
            rows,
            batch["input_ids"],
            batch["attention_mask"],
            max_new_tokens=max_new_tokens,
            pad_token_id=pad,
            eos_token_id=eos,
            **generate_kwargs,
        )
        for seq in new.tolist():
            if seq2seq and seq and seq[0] == prefixed.model.config.decoder_start_token_id:
                seq = seq[1:]
            if eos is not None and eos in seq:
                seq = seq[: seq.index(eos)]
            texts.append(tokenizer.decode(seq, skip_special_tokens=True).strip())
    return texts
