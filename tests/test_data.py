import json
import os

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from workers.batches import (
    ExampleStream,
    collate_causal,
    collate_prompts_left,
    collate_prompts_right,
    collate_seq2seq,
)
from workers.data import DataError, DataSettings, load_task_data

datasets.disable_progress_bars()

PAD, BOS, EOS = 0, 1, 2
WORDS = "Q A : the a cat dog sat ran on in mat park big small red".split()
VOCAB = {w: i for i, w in enumerate(["<pad>", "<s>", "</s>", "<unk>"] + WORDS)}
ID = VOCAB


def make_tokenizer(post: str | None = None) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over VOCAB. post: None, 'bos' (Llama-like: '<s> $A') or 'eos' (T5-like: '$A </s>')."""
    tk = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    if post == "bos":
        tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    elif post == "eos":
        tk.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", EOS)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def ids(text: str) -> list[int]:
    return [ID[w] for w in text.replace(":", " : ").split()]


ROWS = [
    {"q": f"the {adj} {animal}", "a": f"{verb} on the mat"}
    for adj in ("big", "small", "red")
    for animal in ("cat", "dog")
    for verb in ("sat", "ran")
]  # 12 rows


def write(path, rows, fmt=None):
    fmt = fmt or path.suffix.lstrip(".")
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "csv":
        cols = list(rows[0])
        path.write_text(",".join(cols) + "\n" + "".join(",".join(str(r[c]) for c in cols) + "\n" for r in rows))
    elif fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return str(path)


def load(tmp_path, tokenizer=None, **kw):
    kw.setdefault("template", None if "input_column" in kw else "Q: {q} A:")
    kw.setdefault("target_column", "a")
    return load_task_data(DataSettings(**kw), tokenizer or make_tokenizer(), cache_dir=str(tmp_path / "cache"))


def test_causal_columns_mask_exactly_the_prompt(tmp_path):
    path = write(tmp_path / "d.jsonl", ROWS)
    data = load(tmp_path, train=path, validation=path)
    row = data.validation[0]
    prompt, target = ids("Q: the big cat A:"), ids("sat on the mat")
    assert row["prompt_ids"] == prompt
    assert row["input_ids"] == prompt + target + [EOS]
    assert row["labels"] == [-100] * len(prompt) + target + [EOS]
    assert (row["target_text"], row["row"]) == ("sat on the mat", 1)
    # A tokenizer that puts BOS before every text gets it before the prompt, masked with the prompt.
    row = load(tmp_path, make_tokenizer("bos"), train=path, validation=path).validation[0]
    assert row["prompt_ids"] == [BOS] + prompt
    assert row["labels"] == [-100] * (len(prompt) + 1) + target + [EOS]


def test_template_and_input_column_agree(tmp_path):
    rows = [dict(r, p=f"Q: {r['q']} A:") for r in ROWS]
    path = write(tmp_path / "d.jsonl", rows)
    by_template = load(tmp_path, train=path, template="Q: {q} A:")
    by_column = load(tmp_path, train=path, input_column="p")
    assert by_template.train.to_dict() == by_column.train.to_dict()
    assert by_template.validation.to_dict() == by_column.validation.to_dict()


def test_every_format_gives_the_same_data(tmp_path):
    results = []
    for name in ("d.jsonl", "d.csv", "d.parquet", "saved"):
        folder = tmp_path / name.replace(".", "_")
        folder.mkdir()
        path = write(folder / name, ROWS, fmt=None if "." in name else "arrow")
        before = sorted(os.listdir(path)) if os.path.isdir(path) else None
        data = load(tmp_path, train=path)
        results.append((data.train.to_dict(), data.validation.to_dict()))
        assert data.train.cache_files  # memory-mapped Arrow, not rows in Python
        if before is not None:
            assert sorted(os.listdir(path)) == before  # nothing written into the user's folder
    assert all(r == results[0] for r in results[1:])
    assert len(results[0][0]["row"]) + len(results[0][1]["row"]) == len(ROWS)


def test_held_out_split_is_deterministic_and_disjoint(tmp_path):
    rows = ROWS + [dict(r, q=r["q"] + " in the park") for r in ROWS]  # 24 rows
    path = write(tmp_path / "d.parquet", rows)

    def split(seed):
        data = load(tmp_path, train=path, seed=seed, validation_fraction=0.25)
        return list(data.train["row"]), list(data.validation["row"])

    train, val = split(0)
    assert len(val) == 6 and sorted(train + val) == list(range(1, 25))
    assert split(0) == (train, val)
    assert split(1)[1] != val
    # Two rows: one each way, whatever the fraction; one row cannot be split.
    assert [len(s) for s in split_of(tmp_path, rows[:2])] == [1, 1]
    with pytest.raises(DataError, match="1 usable row.*at least 2"):
        split_of(tmp_path, rows[:1])


def split_of(tmp_path, rows):
    path = write(tmp_path / f"n{len(rows)}.jsonl", rows)
    data = load(tmp_path, train=path, validation_fraction=0.01)
    return data.train, data.validation


def test_truncation_policies(tmp_path):
    rows = [
        {"q": "the big red cat", "a": "sat"},  # BOS + prompt 8 + target 1 + eos = 11 tokens
        {"q": "a dog", "a": "ran"},  # 1 + 6 + 2 = 9
        {"q": "a cat", "a": "sat on the big red mat in the park"},  # target + eos: 10 alone
    ]
    path = write(tmp_path / "d.jsonl", rows)
    tok = make_tokenizer("bos")
    # left: row 1 (BOS + 8 + 2 = 11) keeps BOS and its last 6 prompt tokens; row 3 cannot fit at all.
    data = load(tmp_path, tok, train=path, validation=path, max_length=9)
    first = data.validation[0]
    assert first["input_ids"] == [BOS] + ids("the big red cat A:") + [ID["sat"], EOS]
    assert first["labels"] == [-100] * 7 + [ID["sat"], EOS]
    report = data.report.files[0]
    assert (report.truncated, report.truncated_examples) == (1, [1])
    assert report.skipped == {"too_long": 1} and report.skipped_examples == {"too_long": [3]}
    assert list(data.validation["row"]) == [1, 2]
    # skip: both long rows go, counted with their row numbers.
    report = load(tmp_path, tok, train=path, validation=path, max_length=9, truncation="skip").report
    assert report.files[0].skipped_examples == {"too_long": [1, 3]}
    assert report.rows_kept == 2 and "2 too_long (rows 1, 3)" in str(report)
    # error: the first long row stops it, named.
    with pytest.raises(
        DataError, match=r"d.jsonl: row 1: prompt \+ target \+ eos is 11 tokens, more than max_length 9"
    ):
        load(tmp_path, tok, train=path, max_length=9, truncation="error")


def test_seq2seq_columns_and_left_truncation(tmp_path):
    path = write(tmp_path / "d.jsonl", [{"q": "the big red cat", "a": "sat"}, {"q": "a dog", "a": "ran"}])
    tok = make_tokenizer("eos")  # T5-like: the encoder input ends with </s>
    data = load(tmp_path, tok, train=path, validation=path, template="{q}", is_seq2seq=True, max_length=3)
    first, second = data.validation[0], data.validation[1]
    assert first["input_ids"] == first["prompt_ids"] == ids("red cat") + [EOS]  # cut on the left, eos kept
    assert first["labels"] == [ID["sat"], EOS]
    assert second["input_ids"] == ids("a dog") + [EOS] and second["labels"] == [ID["ran"], EOS]
    assert data.report.files[0].truncated_examples == [1]


def test_numbers_become_text_and_empty_targets_are_counted(tmp_path):
    rows = [
        {"q": "the cat", "a": 42},
        {"q": "the dog", "a": ""},
        {"q": 7, "a": "sat"},
        {"q": "a cat", "a": None},
        {"q": None, "a": "ran"},
        {"q": "a dog", "a": "  "},
        {"q": "the mat"},  # no target at all
    ]
    for name in ("d.jsonl", "d.parquet"):
        if name.endswith("parquet"):  # a Parquet column has one type
            rows = [{k: None if r.get(k) is None else str(r[k]) for k in ("q", "a")} for r in rows]
        path = write(tmp_path / name, rows)
        data = load(tmp_path, train=path, validation=path, template="{q}")
        assert data.validation["target_text"] == ["42", "sat"]
        assert data.validation["prompt_ids"][1] == [VOCAB["<unk>"]]  # "7"
        report = data.report.files[0]
        assert report.skipped == {"missing_input": 1, "empty_target": 4}
        assert report.skipped_examples == {"missing_input": [5], "empty_target": [2, 4, 6, 7]}
        assert str(report) == (
            f"{path}: 7 rows read, 2 kept; skipped 1 missing_input (row 5), 4 empty_target (rows 2, 4, 6, 7)"
        )


def test_csv_reads_text_as_is(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('q,a\nthe cat,None\nthe dog,NA\n"a\ncat",007\nthe mat,\n')
    data = load(tmp_path, train=str(path), validation=str(path), template="{q}")
    assert data.validation["target_text"] == ["None", "NA", "007"]
    assert data.report.files[0].skipped_examples == {"empty_target": [4]}


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "d.jsonl: the file is empty"),
        (b"\n\n", "d.jsonl: the file has no rows"),
        (b'{"q": "a", "a": "b"}\n{"q": "\xff", "a": "b"}\n', r"d.jsonl: line 2: not UTF-8"),
        (b'{"q": "a", "a": "b"}\n{"q": "a",\n', r"d.jsonl: line 2 is not valid JSON"),
        (b'{"q": "a", "a": "b"}\n{"q": ["a"], "a": "b"}\n', r"d.jsonl: row 2, column 'q': a list"),
        (b'{"q": "a", "a": true}\n', r"d.jsonl: row 1, column 'a': a bool \(True\); accepted: text or numbers"),
        (b'{"q": "a", "a": {"x": 1}}\n', r"d.jsonl: row 1, column 'a': a dict"),
        (
            b'{"q": "a", "b": "b"}\n',
            r"d.jsonl: no column 'a' \(named by data.target_column\); the file has columns: q, b",
        ),
        (b'{"x": "a", "a": "b"}\n', r"no column 'q' \(named by data.template\); the file has columns: x, a"),
        (b'{"q": "a", "a": ""}\n{"q": "a"}\n', r"(?s)d.jsonl: every row was skipped.*2 empty_target \(rows 1, 2\)"),
    ],
)
def test_bad_jsonl_is_named(tmp_path, content, message):
    (tmp_path / "d.jsonl").write_bytes(content)
    with pytest.raises(DataError, match=message) as e:
        load(tmp_path, train=str(tmp_path / "d.jsonl"), validation=str(tmp_path / "d.jsonl"), template="{q}")
    assert "d.jsonl" in str(e.value)


def test_bad_files_of_other_formats_are_named(tmp_path):
    with pytest.raises(DataError, match="nope.parquet: no such file"):
        load(tmp_path, train=str(tmp_path / "nope.parquet"))
    (tmp_path / "d.csv").write_bytes(b"q,a\nthe cat,sat\nthe \xe9 dog,ran\n")
    with pytest.raises(DataError, match=r"d.csv: line 3: not UTF-8 text \(undecodable byte 0xe9"):
        load(tmp_path, train=str(tmp_path / "d.csv"))
    (tmp_path / "h.csv").write_text("q,a\n")
    with pytest.raises(DataError, match="h.csv: the file has no rows"):
        load(tmp_path, train=str(tmp_path / "h.csv"))
    empty = pa.array([], pa.string())
    pq.write_table(pa.table({"q": empty, "a": empty}), tmp_path / "e.parquet")
    with pytest.raises(DataError, match="e.parquet: the file has no rows"):
        load(tmp_path, train=str(tmp_path / "e.parquet"))
    pq.write_table(pa.table({"q": ["a"], "a": [b"\x00"]}), tmp_path / "b.parquet")
    with pytest.raises(DataError, match=r"b.parquet: row 1, column 'a': a bytes"):
        load(tmp_path, train=str(tmp_path / "b.parquet"))
    good = write(tmp_path / "good.jsonl", ROWS)
    with pytest.raises(DataError, match="validation.jsonl: no such file"):
        load(tmp_path, train=good, validation=str(tmp_path / "validation.jsonl"))


def test_validation_rows_are_bounded(tmp_path):
    good = write(tmp_path / "good.jsonl", ROWS)  # 12 rows
    message = r"data.max_validation_rows: .*good.jsonl has 12 rows, more than the bound of 5"
    with pytest.raises(DataError, match=message):
        load(tmp_path, train=good, validation=good, max_validation_rows=5)
    assert load(tmp_path, train=good, validation=good, max_validation_rows=12).report.validation_rows == 12
    message = r"data.max_validation_rows: holding out 0.4 of the 12 usable rows of .* makes 5 validation rows, more "
    with pytest.raises(DataError, match=message + "than the bound of 4"):
        load(tmp_path, train=good, validation_fraction=0.4, max_validation_rows=4)
    assert load(tmp_path, train=good, validation_fraction=0.4, max_validation_rows=5).report.validation_rows == 5


def test_cache_follows_the_file_and_the_settings(tmp_path):
    path = tmp_path / "d.jsonl"
    write(path, ROWS[:3])
    first = load(tmp_path, train=str(path), validation=str(path))
    again = load(tmp_path, train=str(path), validation=str(path))
    assert again.validation.cache_files == first.validation.cache_files
    assert load(tmp_path, train=str(path), validation=str(path), max_length=5).report.files[0].truncated == 3
    write(path, [{"q": "a dog", "a": "ran"}])
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 10**9))
    assert load(tmp_path, train=str(path), validation=str(path)).validation["target_text"] == ["ran"]


def test_large_parquet_stays_in_arrow(tmp_path):
    n = 200_000
    path = tmp_path / "big.parquet"
    table = pa.table({"q": pa.array(["the big cat", "a dog"] * (n // 2)), "a": pa.array(["sat", ""] * (n // 2))})
    pq.write_table(table, path)
    data = load(tmp_path, train=str(path), template="{q}")
    assert isinstance(data.train.data, datasets.table.MemoryMappedTable)
    assert data.report.rows_read == n and data.report.skipped == {"empty_target": n // 2}
    assert len(data.train) + len(data.validation) == n // 2 and len(data.validation) == n // 20
    assert data.train[-1]["input_ids"] == ids("the big cat sat") + [EOS]


def test_example_stream_is_deterministic_and_resumes_exactly():
    reference = ExampleStream(10, seed=3)
    drawn = [reference.next_indices(4) for _ in range(6)]  # 24 indices: 2.4 epochs
    flat = sum(drawn, [])
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))
    assert flat[:10] != flat[10:20]  # a fresh order each epoch
    assert reference.epochs_completed == pytest.approx(2.4)
    assert ExampleStream(10, seed=3).next_indices(24) == flat
    assert ExampleStream(10, seed=4).next_indices(10) != flat[:10]
    for stop in (1, 2, 3):  # mid-epoch (4 of 10), and past an epoch boundary (8, then 12)
        stream = ExampleStream(10, seed=3)
        for _ in range(stop):
            stream.next_indices(4)
        state = stream.state_dict()
        resumed = ExampleStream(10, seed=3)
        resumed.load_state_dict(state)
        assert resumed.epochs_completed == pytest.approx(stop * 0.4)
        assert sum((resumed.next_indices(4) for _ in range(6 - stop)), []) == flat[4 * stop :]
    with pytest.raises(ValueError, match="n=10, seed=3.*n=11, seed=3"):
        ExampleStream(11, seed=3).load_state_dict(reference.state_dict())


def test_collate_pads_training_right_and_prompts_left():
    rows = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    batch = collate_causal(rows, pad_id=PAD)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert all(t.dtype == torch.long for t in batch.values())
    columns = {"input_ids": [[5, 6, 7], [8]], "labels": [[-100, 6, 7], [8]]}  # as ds[idx] gives them
    assert all(torch.equal(collate_causal(columns, PAD)[k], batch[k]) for k in batch)
    s2s = collate_seq2seq([{"input_ids": [5, 2], "labels": [6, 7, 2]}, {"input_ids": [8, 9, 2], "labels": [2]}], PAD)
    assert s2s["input_ids"].tolist() == [[5, 2, 0], [8, 9, 2]]
    assert s2s["attention_mask"].tolist() == [[1, 1, 0], [1, 1, 1]]
    assert s2s["labels"].tolist() == [[6, 7, 2], [2, -100, -100]]
    left = collate_prompts_left([[5, 6, 7], [8]], PAD)
    assert left["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert left["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert collate_prompts_right([[5, 6, 7], [8]], PAD)["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]


def test_collate_real_rows_end_to_end(tmp_path):
    path = write(tmp_path / "d.jsonl", ROWS)
    data = load(tmp_path, make_tokenizer("bos"), train=path)
    stream = ExampleStream(len(data.train), seed=0)
    batch = collate_causal(data.train[stream.next_indices(4)], pad_id=PAD)
    assert batch["input_ids"].shape == batch["labels"].shape == (4, 13)  # BOS Q : the x y A : | v on the mat EOS
    assert ((batch["labels"] != -100).sum(1) == 5).all()  # 4 target tokens + eos per row
