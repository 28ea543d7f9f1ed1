import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.datafiles import DataFileError, detect_format, read_column_names


def test_columns_of_each_format(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"input": "x", "target": "y"}) + "\n")
    (tmp_path / "a.csv").write_text("input,target\nx,y\n")
    pq.write_table(pa.table({"input": ["x"], "target": ["y"]}), tmp_path / "a.parquet")
    for name in ("a.jsonl", "a.csv", "a.parquet"):
        assert read_column_names(tmp_path / name) == ["input", "target"]


def test_saved_dataset_folder(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"q": ["a"], "a": ["b"]}).save_to_disk(tmp_path / "ds")
    assert detect_format(tmp_path / "ds") == "arrow"
    assert read_column_names(tmp_path / "ds") == ["q", "a"]


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("empty.jsonl", b"", "empty"),
        ("bad.jsonl", b"{not json\n", "line 1 is not valid JSON"),
        ("list.jsonl", b"[1, 2]\n", "not an object"),
        ("latin.csv", b"inp\xe9t,target\n", "not UTF-8"),
        ("data.txt", b"x", "cannot tell the format"),
    ],
)
def test_bad_files_name_the_file(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataFileError, match=message) as e:
        read_column_names(path)
    assert name in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(DataFileError, match="no such file"):
        read_column_names(tmp_path / "nope.jsonl")
