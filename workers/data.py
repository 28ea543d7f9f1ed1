"""One task's training data: files -> tokenized Arrow datasets, a resumable example order, padded batches.

    data = load_task_data(DataSettings(train="qa.jsonl", template="Q: {q}\\nA:", target_column="a"), tok)
    stream = ExampleStream(len(data.train), seed=0)
    batch = collate_causal(data.train[stream.next_indices(8)], pad_id=tok.pad_token_id)

Files are read with `datasets` (JSON lines, CSV, Parquet, or a folder saved with `save_to_disk`) into its
memory-mapped Arrow cache and tokenized with batched `map` calls, so a file larger than memory works and
no Python list of all rows is ever built. Every row that is not used is counted, with example row
numbers, in `TaskData.report`; every row that cannot be read raises `DataError` naming the file, the row
and the column. A file or folder named by a storage URI (s3://bucket/data/train.jsonl; `workers/storage.py`)
is copied into the cache first and read from there.

Columns of `TaskData.train` and `TaskData.validation` (lists of token ids unless said otherwise):

- causal LM:  `input_ids` = prompt + target + [eos];  `labels` = [-100] * len(prompt) + target + [eos];
              `prompt_ids` = prompt (what generation starts from); the prompt begins with the BOS token
              only when the tokenizer itself adds one (`tokenizer("x")` starts with `bos_token_id`).
- seq2seq:    `input_ids` = `prompt_ids` = the encoder tokens, with the tokenizer's own special tokens;
              `labels` = target + [eos] (no BOS: the model prepends its decoder start token itself).
- both:       `target_text` (str, the reference as read) and `row` (int, the row's 1-based number in its
              file: the data line of a JSON-lines file, the record after a CSV's header).

The prompt is the input column's text, or the template filled in, used exactly as is: no separator is
added between prompt and target, so a template should end with the one it wants ("Q: {q}\\nA:"), and the
target starts with a space only when the data's target does. Prompt and target are tokenized apart, so
the label boundary is exact and the training prompt equals the generation prompt. (A tokenizer that adds
a space before every text, as SentencePiece models with `add_prefix_space` do, adds one to the target.)
"""

from __future__ import annotations

import csv
import json
import math
import numbers
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import datasets.fingerprint
import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from jobs.datafiles import FORMATS, DataFileError, detect_format, read_column_names
from jobs.fields import DataSpec, spec_default
from workers.storage import fetch, is_remote

IGNORE_INDEX = -100  # label value the loss skips: prompt and padding positions
TRUNCATION = ("left", "skip", "error")
SKIP_REASONS = ("missing_input", "empty_target", "too_long")
_EXAMPLES = 5  # example row numbers kept per skip reason
_CACHE_VERSION = "prefixd-data-1"  # bump when the tokenized columns change meaning


class DataError(DataFileError):
    """Task data that cannot be used; the message names the file, and the row and column when it can."""


@dataclass(frozen=True, kw_only=True)
class DataSettings:
    """Where a task's data is and how its rows become token ids (the job spec's `data`, with paths as text;
    defaults are the spec's)."""

    train: str
    """Training data: a .jsonl/.json, .csv or .parquet file, or a folder written by `save_to_disk`; a local
    path or a storage URI (s3://...)."""
    validation: str | None = None
    """Validation data in the same layout; None holds out `validation_fraction` of `train`."""
    format: str = spec_default(DataSpec, "format")
    """'auto' (from the suffix, or 'arrow' for a folder) or one of jsonl, csv, parquet, arrow."""
    input_column: str | None = None
    """The column whose text is the prompt. Exactly one of input_column and template."""
    template: str | None = None
    """The prompt as `str.format` text over columns, e.g. "Q: {question}\\nA:"; used as is (no separator)."""
    target_column: str
    """The column holding the text to learn; numbers are turned into text, empty rows are skipped."""
    max_length: int = spec_default(DataSpec, "max_length")
    """Most tokens in one example: prompt + target + eos (seq2seq: encoder input, and target + eos, each)."""
    truncation: str = spec_default(DataSpec, "truncation")
    """A too-long row: 'left' drops prompt tokens from its start, 'skip' drops the row, 'error' raises.
    A target that cannot fit even with an empty prompt is skipped as 'too_long' unless 'error'."""
    validation_fraction: float = spec_default(DataSpec, "validation_fraction")
    """Share of the usable train rows held out when `validation` is None (at least 1 row)."""
    seed: int = spec_default(DataSpec, "seed")
    """Seed of the held-out split."""
    is_seq2seq: bool = False
    """Encoder-decoder base model: the prompt feeds the encoder, the target the decoder."""

    def __post_init__(self) -> None:
        problems = []
        if (self.input_column is None) == (self.template is None):
            problems.append("give exactly one of input_column and template")
        if self.template is not None:
            try:
                template_fields(self.template)
            except ValueError as e:
                problems.append(str(e))
        if self.format != "auto" and self.format not in FORMATS:
            problems.append(f"format {self.format!r} is not one of auto, {', '.join(FORMATS)}")
        if self.truncation not in TRUNCATION:
            problems.append(f"truncation {self.truncation!r} is not one of {', '.join(TRUNCATION)}")
        if not (isinstance(self.max_length, int) and self.max_length >= 2):
            problems.append(f"max_length {self.max_length!r} must be an integer >= 2")
        if not 0 < self.validation_fraction < 1:
            problems.append(f"validation_fraction {self.validation_fraction!r} must lie strictly between 0 and 1")
        if not (isinstance(self.seed, int) and self.seed >= 0):
            problems.append(f"seed {self.seed!r} must be an integer >= 0")
        if problems:
            raise DataError("data settings: " + "; ".join(problems))


def template_fields(template: str) -> list[str]:
    """The column names a prompt template reads, in order of first use; ValueError for a malformed one."""
    fields: list[str] = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ValueError(f"template {template!r}: {e} (write a literal brace as '{{{{' or '}}}}')") from None
    for _, name, _, _ in parsed:
        if name is None:
            continue
        if name == "" or name.isdigit() or "." in name or "[" in name:
            raise ValueError(
                f"template {template!r}: placeholder {{{name}}} must be a plain column name, like {{question}}"
            )
        if name not in fields:
            fields.append(name)
    return fields


@dataclass(frozen=True, kw_only=True)
class FileReport:
    """What became of one file's rows. Row numbers are 1-based, as in `row` and in error messages."""

    path: str
    rows_read: int
    rows_kept: int
    skipped: dict[str, int]
    """Rows left out, by reason: 'missing_input', 'empty_target', 'too_long'."""
    skipped_examples: dict[str, list[int]]
    """The first few row numbers per reason."""
    truncated: int
    """Rows kept with prompt tokens dropped from the left (truncation='left')."""
    truncated_examples: list[int]

    def __str__(self) -> str:
        text = f"{self.path}: {self.rows_read} rows read, {self.rows_kept} kept"
        if self.skipped:
            parts = [f"{n} {why} ({_rows(self.skipped_examples[why], n)})" for why, n in self.skipped.items()]
            text += "; skipped " + ", ".join(parts)
        if self.truncated:
            cut = _rows(self.truncated_examples, self.truncated)
            text += f"; prompt cut on the left in {self.truncated} ({cut})"
        return text


@dataclass(frozen=True, kw_only=True)
class DataReport:
    """What load_task_data read, kept, skipped and how it split; `str(report)` is for logs."""

    files: tuple[FileReport, ...]
    """The train file's report, then the validation file's when there is one."""
    train_rows: int
    validation_rows: int
    split: str
    """Where the validation rows come from, in words."""

    @property
    def rows_read(self) -> int:
        return sum(f.rows_read for f in self.files)

    @property
    def rows_kept(self) -> int:
        return sum(f.rows_kept for f in self.files)

    @property
    def skipped(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for f in self.files:
            for why, n in f.skipped.items():
                total[why] = total.get(why, 0) + n
        return total

    def __str__(self) -> str:
        lines = [str(f) for f in self.files]
        lines.append(f"split: {self.train_rows} train, {self.validation_rows} validation ({self.split})")
        return "\n".join(lines)


@dataclass(frozen=True, kw_only=True)
class TaskData:
    """Tokenized, Arrow-backed (memory-mapped) splits; columns as in the module docstring."""

    train: datasets.Dataset
    validation: datasets.Dataset
    report: DataReport


def load_task_data(settings: DataSettings, tokenizer: Any, *, cache_dir: str | None = None) -> TaskData:
    """Read, check and tokenize a task's data; hold out a validation split when no file is given.

    cache_dir: where `datasets` keeps its Arrow copies and the tokenized columns (reused while the file,
    the settings and the tokenizer stay the same); None uses the `datasets` cache. Nothing is ever written
    next to the data. Raises DataError naming the file (and row/column) for data that cannot be used.
    """
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no eos token: targets must end with one; set tokenizer.eos_token")
    work_dir = Path(cache_dir) if cache_dir is not None else Path(datasets.config.HF_DATASETS_CACHE)
    work_dir = work_dir / "prefixd-tokenized"
    work_dir.mkdir(parents=True, exist_ok=True)

    train, train_report, train_kept = _load_file(settings.train, settings, tokenizer, work_dir, cache_dir)
    if settings.validation is not None:
        val, val_report, val_kept = _load_file(settings.validation, settings, tokenizer, work_dir, cache_dir)
        files = (train_report, val_report)
        train_split, val_split = train.select(train_kept), val.select(val_kept)
        split = f"validation rows from {settings.validation}"
    else:
        n = len(train_kept)
        if n < 2:
            raise DataError(
                f"{settings.train}: {n} usable row(s), but holding out a validation split needs at least 2; "
                f"add rows or give a validation file\n{train_report}"
            )
        n_val = min(n - 1, max(1, round(n * settings.validation_fraction)))
        # The split depends on (seed, usable rows) only: the same seed gives the same rows on every worker.
        order = np.random.default_rng(settings.seed).permutation(n)
        files = (train_report,)
        train_split = train.select(np.sort(train_kept[order[n_val:]]))
        val_split = train.select(np.sort(train_kept[order[:n_val]]))
        split = f"held out {n_val} of the {n} usable rows of {settings.train}, seed {settings.seed}"
    report = DataReport(files=files, train_rows=len(train_split), validation_rows=len(val_split), split=split)
    return TaskData(train=train_split, validation=val_split, report=report)


def _load_file(
    path: str, settings: DataSettings, tokenizer: Any, work_dir: Path, cache_dir: str | None
) -> tuple[datasets.Dataset, FileReport, np.ndarray]:
    """Tokenize every row of one file; return (all rows tokenized, report, positions of the usable rows)."""
    raw = _read_local_or_remote(path, settings.format, cache_dir, work_dir)
    fields = [settings.input_column] if settings.template is None else template_fields(settings.template)
    named_by = "data.input_column" if settings.template is None else "data.template"
    for column, by in [(c, named_by) for c in fields] + [(settings.target_column, "data.target_column")]:
        if column not in raw.column_names:
            columns = ", ".join(raw.column_names)
            raise DataError(f"{path}: no column {column!r} (named by {by}); the file has columns: {columns}")
    # The tokenized cache's key: the raw data's own fingerprint (`datasets` derives it from the file's path,
    # size and mtime, or a saved folder's state), what shapes the tokens, and the tokenizer's full definition.
    fingerprint = datasets.fingerprint.Hasher.hash(
        (_CACHE_VERSION, raw._fingerprint, _settings_key(settings), _tokenizer_key(tokenizer))
    )
    tokenized = raw.map(
        _Tokenize(path, settings, tokenizer, fields),
        batched=True,
        with_indices=True,
        remove_columns=raw.column_names,
        features=_FEATURES,
        new_fingerprint=fingerprint,
        cache_file_name=str(work_dir / f"tokenized-{fingerprint}.arrow"),
        desc=f"tokenizing {Path(path).name}",
    )
    # The bookkeeping columns are counted with Arrow compute: no Python pass over the rows.
    skip, truncated, row = (tokenized.data.column(c) for c in ("skip", "truncated", "row"))
    skipped, examples = {}, {}
    for why in SKIP_REASONS:
        mask = pc.equal(skip, why)
        n = pc.sum(mask).as_py() or 0
        if n:
            skipped[why] = n
            examples[why] = pc.filter(row, mask).slice(0, _EXAMPLES).to_pylist()
    n_trunc = pc.sum(truncated).as_py() or 0
    kept = np.flatnonzero(pc.equal(skip, "").to_numpy(zero_copy_only=False))
    report = FileReport(
        path=path,
        rows_read=len(tokenized),
        rows_kept=len(kept),
        skipped=skipped,
        skipped_examples=examples,
        truncated=n_trunc,
        truncated_examples=pc.filter(row, truncated).slice(0, _EXAMPLES).to_pylist() if n_trunc else [],
    )
    if len(kept) == 0:
        raise DataError(f"{path}: every row was skipped, nothing to train on\n{report}")
    return tokenized.remove_columns(["skip", "truncated"]), report, kept


_FEATURES = datasets.Features(
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


def _read_local_or_remote(path: str, fmt: str, cache_dir: str | None, work_dir: Path) -> datasets.Dataset:
    """`_read` of a local path, or of the cached copy of a file or folder named by a storage URI
    (s3://...; `workers.storage.fetch`, kept beside the tokenized cache), with errors naming the URI."""
    if not is_remote(path):
        return _read(Path(path), fmt, cache_dir)
    try:
        local = fetch(path, work_dir.parent, setting="data")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file or folder") from None
    except OSError as e:  # StorageError: unreachable, refused; names the URI and the fix
        raise DataError(str(e)) from None
    try:
        return _read(local, fmt, cache_dir)
    except DataError as e:
        raise DataError(str(e).replace(str(local), path)) from None


def _read(path: Path, fmt: str, cache_dir: str | None) -> datasets.Dataset:
    """The file's rows as a memory-mapped Arrow dataset; DataError naming the file (and line) otherwise."""
    try:
        fmt = detect_format(path, fmt)
    except DataFileError as e:
        raise DataError(str(e)) from None
    try:
        names = read_column_names(path, fmt)  # missing, empty, undecodable header, not a saved dataset
    except DataFileError as e:
        # Its reader decodes a block at a time, so a bad byte further down can surface here: find its line.
        raise DataError((path.is_file() and _bad_line(path, fmt)) or str(e)) from None
    try:
        if fmt == "arrow":
            ds = datasets.load_from_disk(str(path))
        elif fmt == "csv":
            # Every column as text, and only an empty field is empty: pandas would otherwise read "NA",
            # "null" or "None" as missing and "007" as the number 7.
            features = datasets.Features({name: datasets.Value("string") for name in names})
            ds = datasets.load_dataset(
                "csv",
                data_files=str(path),
                split="train",
                cache_dir=cache_dir,
                features=features,
                keep_default_na=False,
            )
        else:
            builder = "json" if fmt == "jsonl" else "parquet"
            ds = datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=cache_dir)
    except Exception as e:
        raise DataError(_read_failure(path, fmt, e)) from e
    if not isinstance(ds, datasets.Dataset):
        raise DataError(f"{path}: holds several splits ({', '.join(ds)}): point at one split's folder")
    if len(ds) == 0:
        raise DataError(f"{path}: the file has no rows")
    return ds


def _read_failure(path: Path, fmt: str, error: Exception) -> str:
    """What went wrong reading a file, with the line where one can be found."""
    where = _bad_line(path, fmt)
    if where:
        return where
    if _has_no_rows(path, fmt):  # `datasets` refuses these with a message about splits
        return f"{path}: the file has no rows"
    cause = error
    while cause.__cause__ is not None:
        cause = cause.__cause__
    return f"{path}: cannot read as {fmt}: {type(cause).__name__}: {cause}"


def _bad_line(path: Path, fmt: str) -> str | None:
    """The first line of a text file that is not UTF-8 (or, for JSON lines, not a JSON object), in words.

    Only called once reading has failed: it scans the file line by line in Python.
    """
    if fmt not in ("jsonl", "csv"):
        return None
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                return (
                    f"{path}: line {lineno}: not UTF-8 text "
                    f"(undecodable byte 0x{raw[e.start]:02x} at byte {e.start + 1} of the line)"
                )
            if fmt == "jsonl" and line.strip():
                try:
                    value = json.loads(line)
                except json.JSONDecodeError as e:
                    return f"{path}: line {lineno} is not valid JSON ({e.msg})"
                if not isinstance(value, dict):
                    return f"{path}: line {lineno} is a JSON {type(value).__name__}, not an object"
    return None


def _has_no_rows(path: Path, fmt: str) -> bool:
    try:
        if fmt == "csv":
            with open(path, encoding="utf-8", newline="") as f:
                records = csv.reader(f)
                next(records, None)  # the header
                return next(records, None) is None
        if fmt == "parquet":
            return pq.ParquetFile(path).metadata.num_rows == 0
    except Exception:  # unreadable for another reason: let the caller report the original error
        pass
    return False


class _Tokenize:
    """The batched `map` function: a batch of raw rows -> the tokenized columns of _FEATURES.

    A class rather than a closure so `datasets` can hash it; the cache key is passed explicitly anyway.
    """

    def __init__(self, path: str, settings: DataSettings, tokenizer: Any, fields: list[str]):
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


def _settings_key(settings: DataSettings) -> tuple:
    # The file paths are part of the raw dataset's fingerprint; the split does not change tokenization.
    return (
        settings.input_column,
        settings.template,
        settings.target_column,
        settings.max_length,
        settings.truncation,
        settings.is_seq2seq,
    )


def _tokenizer_key(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    specials = (tokenizer.bos_token_id, tokenizer.eos_token_id, sorted(tokenizer.all_special_ids))
    if backend is not None:
        return datasets.fingerprint.Hasher.hash((type(tokenizer).__name__, backend.to_str(), specials))
    return datasets.fingerprint.Hasher.hash(tokenizer)


def _rows(examples: list[int], count: int) -> str:
    more = ", ..." if count > len(examples) else ""
    return ("row " if len(examples) == 1 and not more else "rows ") + ", ".join(map(str, examples)) + more


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
