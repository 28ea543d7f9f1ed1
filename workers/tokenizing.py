"""Raw rows -> token ids: the batched `datasets.map` function that makes a task's columns, and its cache key.

Columns made (FEATURES) are described in `workers/data.py`; `skip` and `truncated` are bookkeeping that
`load_task_data` counts and drops.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import datasets
import datasets.fingerprint

from workers.batches import IGNORE_INDEX
from workers.reading import DataError

SKIP_REASONS = ("missing_input", "empty_target", "too_long")
CACHE_VERSION = "prefixd-data-1"  # bump when the tokenized columns change meaning


FEATURES = datasets.Features(
    {
        "input_ids": datasets.List(datasets.Value("int32")),
        "labels": datasets.List(datasets.Value("int32")),
        "prompt_ids": datasets.List(datasets.Value("int32")),
        "target_text": datasets.Value("string"),
        "row": datasets.Value("int64"),
        "skip": datasets.Value("string"),  # "" or one of SKIP_REASONS
        "truncated": datasets.Value("bool"),
    }
)


class Tokenize:
    """The batched `map` function: a batch of raw rows -> the tokenized columns of _FEATURES.

    A class rather than a closure so `datasets` can hash it; the cache key is passed explicitly anyway.
    """

    def __init__(self, path: str, settings: Any, tokenizer: Any, fields: list[str]):
        self.path, self.s, self.tok, self.fields = path, settings, tokenizer, fields
        self.bos = leading_bos(tokenizer) if not settings.is_seq2seq else []
        self.special = set(tokenizer.all_special_ids)

    def __call__(self, batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        s = self.s
        rows = [i + 1 for i in indices]
        prompts, targets, skip = [], [], []
        for j, row in enumerate(rows):
            values = {c: self._text(batch[c][j], row, c) for c in self.fields}
            target = self._text(batch[s.target_column][j], row, s.target_column)
            if any(v is None for v in values.values()):
                why = "missing_input"
            elif target is None or not target.strip():
                why = "empty_target"
            else:
                why = ""
            skip.append(why)
            if why:
                prompts.append("")
                targets.append("")
            else:
                prompts.append(values[s.input_column] if s.template is None else s.template.format_map(values))
                targets.append(target)

        prompt_tok = self.tok(prompts, add_special_tokens=s.is_seq2seq, return_attention_mask=False)["input_ids"]
        target_tok = self.tok(targets, add_special_tokens=False, return_attention_mask=False)["input_ids"]
        eos = self.tok.eos_token_id
        out: dict[str, list] = {"input_ids": [], "labels": [], "prompt_ids": [], "truncated": []}
        for j, row in enumerate(rows):
            prompt, target, cut = prompt_tok[j], target_tok[j] + [eos], False
            if not skip[j]:
                prompt, cut, skip[j] = self._fit(prompt, target, row)
            if skip[j]:
                prompt, target = [], []
            if s.is_seq2seq:
                out["input_ids"].append(prompt)
                out["labels"].append(target)
            else:
                prompt = self.bos + prompt if not skip[j] else []
                out["input_ids"].append(prompt + target)
                out["labels"].append([IGNORE_INDEX] * len(prompt) + target)
            out["prompt_ids"].append(prompt)
            out["truncated"].append(cut)
        out["target_text"] = [t if not why else "" for t, why in zip(targets, skip)]
        out["row"] = rows
        out["skip"] = skip
        return out

    def _fit(self, prompt: list[int], target: list[int], row: int) -> tuple[list[int], bool, str]:
        """Apply max_length: (prompt, whether cut, skip reason or "")."""
        s, limit = self.s, self.s.max_length
        if s.is_seq2seq:
            # Encoder and decoder each get max_length tokens.
            prompt_room, total = limit, len(prompt)
            if len(target) > limit:
                return self._too_long(row, f"target + eos is {len(target)} tokens", prompt)
        else:
            prompt_room = limit - len(self.bos) - len(target)
            total = len(self.bos) + len(prompt) + len(target)
            if prompt_room < 0:
                what = f"target + eos alone is {len(target)} tokens" + (" (+1 BOS)" if self.bos else "")
                return self._too_long(row, what, prompt)
        if len(prompt) <= prompt_room:
            return prompt, False, ""
        if s.truncation == "left":
            return self._cut_left(prompt, prompt_room), True, ""
        what = "prompt" if s.is_seq2seq else "prompt + target + eos"
        return self._too_long(row, f"{what} is {total} tokens", prompt)

    def _too_long(self, row: int, what: str, prompt: list[int]) -> tuple[list[int], bool, str]:
        if self.s.truncation == "error":
            raise DataError(
                f"{self.path}: row {row}: {what}, more than max_length {self.s.max_length} "
                f"(truncation 'error'; 'left' cuts the prompt, 'skip' drops such rows)"
            )
        return prompt, False, "too_long"

    def _cut_left(self, prompt: list[int], room: int) -> list[int]:
        """Keep the last tokens of the prompt, but the tokenizer's own leading/trailing special tokens."""
        if not self.s.is_seq2seq:
            return prompt[len(prompt) - room :]
        head = 0
        while head < len(prompt) and prompt[head] in self.special:
            head += 1
        tail = 0
        while tail < len(prompt) - head and prompt[len(prompt) - 1 - tail] in self.special:
            tail += 1
        body = prompt[head : len(prompt) - tail]
        keep = max(0, room - head - tail)
        return prompt[:head] + body[len(body) - keep :] + prompt[len(prompt) - tail :]

    def _text(self, value: Any, row: int, column: str) -> str | None:
        """A cell as text: strings as they are, numbers written out, null (or NaN) as None."""
        if value is None or isinstance(value, str):
            return value
        if isinstance(value, numbers.Number) and not isinstance(value, (bool, complex)):
            if isinstance(value, float) and math.isnan(value):
                return None
            return str(value)
        shown = repr(value)
        shown = shown if len(shown) <= 40 else shown[:37] + "..."
        raise DataError(
            f"{self.path}: row {row}, column {column!r}: a {type(value).__name__} ({shown}); accepted: text or numbers"
        )


def leading_bos(tokenizer: Any) -> list[int]:
    """[bos_token_id] when the tokenizer puts BOS before a text by itself (Llama-style), else [].

    Read off its behaviour, not a flag: `add_bos_token` is not set by every tokenizer that adds one.
    """
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    with_special = tokenizer("a b", add_special_tokens=True)["input_ids"]
    without = tokenizer("a b", add_special_tokens=False)["input_ids"]
    return [bos] if with_special[:1] == [bos] and without[:1] != [bos] else []


def settings_key(settings: Any) -> tuple:
    """What in a task's DataSettings shapes its tokens."""
    # The file paths are part of the raw dataset's fingerprint; the split does not change tokenization.
    return (
        settings.input_column,
        settings.template,
        settings.target_column,
        settings.max_length,
        settings.truncation,
        settings.is_seq2seq,
    )


def tokenizer_key(tokenizer: Any) -> str:
    """A hash of the tokenizer's full definition (vocabulary, rules, special tokens)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    specials = (tokenizer.bos_token_id, tokenizer.eos_token_id, sorted(tokenizer.all_special_ids))
    if backend is not None:
        return datasets.fingerprint.Hasher.hash((type(tokenizer).__name__, backend.to_str(), specials))
    return datasets.fingerprint.Hasher.hash(tokenizer)
