"""One task's training data: files -> tokenized Arrow datasets, split into train and validation.

    data = load_task_data(DataSettings(train="qa.jsonl", template="Q: {q}\\nA:", target_column="a"), tok)
    data.train[0]["input_ids"], data.report.validation_rows

Files (JSON lines, CSV, Parquet, a `save_to_disk` folder, or a storage URI copied into the cache first) are
read by `workers/reading.py` into `datasets`' memory-mapped cache and tokenized by `workers/tokenizing.py`
in batched `map` calls, so a file may be larger than memory. Unused rows are counted in `TaskData.report`;
an unreadable row raises `DataError` naming the file, row and column.

Columns of `TaskData.train` / `.validation` (token-id lists unless said otherwise):
- causal LM: `input_ids` = prompt + target + [eos]; `labels` = [-100] * len(prompt) + target + [eos];
  `prompt_ids` = prompt (generation starts there; it begins with BOS only when the tokenizer adds one).
- seq2seq: `input_ids` = `prompt_ids` = encoder tokens with the tokenizer's special tokens;
  `labels` = target + [eos] (no BOS: the model prepends its decoder start token).
- both: `target_text` (str, the reference as read) and `row` (int, 1-based: the data line of a JSON-lines
  file, the record after a CSV header).

The prompt is the input column or the filled template, exactly as is: no separator is added, so a template
ends with its own ("Q: {q}\\nA:"), and the target starts with a space only when the data's does. Prompt and
target are tokenized apart, so the label boundary is exact and the training prompt equals the generation
prompt (a tokenizer with `add_prefix_space` adds a space to the target too). Batching: `workers/batches.py`.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import datasets.fingerprint
import numpy as np
import pyarrow.compute as pc

from jobs.fields import DataSpec, spec_default
from workers.reading import DataError, read_rows
from workers.tokenizing import CACHE_VERSION, FEATURES, SKIP_REASONS, Tokenize, settings_key, tokenizer_key

_EXAMPLES = 5  # example row numbers kept per skip reason


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
    max_validation_rows: int = spec_default(DataSpec, "max_validation_rows")
    """Most validation rows: a validation file with more rows, or a held-out share larger, is refused."""
    is_seq2seq: bool = False
    """Encoder-decoder base model: the prompt feeds the encoder, the target the decoder."""

    def __post_init__(self) -> None:
        # The job spec's validation (jobs/validate.py) checks every setting; this is what code could break.
        assert (self.input_column is None) != (self.template is None), "exactly one of input_column and template"


def template_fields(template: str) -> list[str]:
    """The column names a prompt template reads, in order of first use (the spec has checked the template).

    template_fields("Q: {question} ({topic}) {question}") == ["question", "topic"]
    """
    names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    return list(dict.fromkeys(names))


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
        val, val_report, val_kept = _load_file(
            settings.validation, settings, tokenizer, work_dir, cache_dir, max_rows=settings.max_validation_rows
        )
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
        if n_val > settings.max_validation_rows:
            raise DataError(
                f"data.max_validation_rows: holding out {settings.validation_fraction} of the {n} usable rows of "
                f"{settings.train} makes {n_val} validation rows, more than the bound of "
                f"{settings.max_validation_rows}; lower data.validation_fraction, give a validation file, or raise "
                "data.max_validation_rows"
            )
        # The split depends on (seed, usable rows) only: the same seed gives the same rows on every worker.
        order = np.random.default_rng(settings.seed).permutation(n)
        files = (train_report,)
        train_split = train.select(np.sort(train_kept[order[n_val:]]))
        val_split = train.select(np.sort(train_kept[order[:n_val]]))
        split = f"held out {n_val} of the {n} usable rows of {settings.train}, seed {settings.seed}"
    report = DataReport(files=files, train_rows=len(train_split), validation_rows=len(val_split), split=split)
    return TaskData(train=train_split, validation=val_split, report=report)


def _load_file(
    path: str,
    settings: DataSettings,
    tokenizer: Any,
    work_dir: Path,
    cache_dir: str | None,
    max_rows: int | None = None,
) -> tuple[datasets.Dataset, FileReport, np.ndarray]:
    """Tokenize every row of one file; return (all rows tokenized, report, positions of the usable rows).
    A file of more than `max_rows` rows (the validation file's bound) is refused before it is tokenized."""
    raw = read_rows(path, settings.format, cache_dir, work_dir)
    if max_rows is not None and len(raw) > max_rows:
        raise DataError(
            f"data.max_validation_rows: {path} has {len(raw)} rows, more than the bound of {max_rows}; "
            "give a smaller validation file or raise data.max_validation_rows"
        )
    fields = [settings.input_column] if settings.template is None else template_fields(settings.template)
    named_by = "data.input_column" if settings.template is None else "data.template"
    for column, by in [(c, named_by) for c in fields] + [(settings.target_column, "data.target_column")]:
        if column not in raw.column_names:
            columns = ", ".join(raw.column_names)
            raise DataError(f"{path}: no column {column!r} (named by {by}); the file has columns: {columns}")
    # The tokenized cache's key: the raw data's own fingerprint (`datasets` derives it from the file's path,
    # size and mtime, or a saved folder's state), what shapes the tokens, and the tokenizer's full definition.
    fingerprint = datasets.fingerprint.Hasher.hash(
        (CACHE_VERSION, raw._fingerprint, settings_key(settings), tokenizer_key(tokenizer))
    )
    tokenized = raw.map(
        Tokenize(path, settings, tokenizer, fields),
        batched=True,
        with_indices=True,
        remove_columns=raw.column_names,
        features=FEATURES,
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


def _rows(examples: list[int], count: int) -> str:
    more = ", ..." if count > len(examples) else ""
    return ("row " if len(examples) == 1 and not more else "rows ") + ", ".join(map(str, examples)) + more
