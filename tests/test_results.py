"""A job's result folder through its one type (workers/results.py): the trainer writes it, the worker group
marks it complete, and the group's and the registrar's readers read back what was written."""

import json
import math
import shutil

import pytest

from tests.tiny import char_tokenizer, tiny_model, tiny_task, write_task
from workers.data import DataSettings
from workers.results import (
    RESULT_FILE,
    TRAINER_OUTPUTS,
    ResultError,
    completed_result,
    finite,
    load_result,
    write_result,
)
from workers.trainer import MultiTaskTrainer


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """(job folder, TaskResult) of a 3-step job on a tiny Llama, evaluated at its last step."""
    root = tmp_path_factory.mktemp("results")
    rows = write_task(root / "rev.jsonl", "reverse")
    data = DataSettings(train=rows, input_column="input", target_column="target", max_length=40)
    config = tiny_task("rev", data, root / "j-1", prefix_length=4, task_id="j-1", steps=3, eval_every=3)
    trainer = MultiTaskTrainer(tiny_model("llama"), char_tokenizer(), micro_batch_size=4)
    trainer.add_task(config)
    [result] = [r for _ in range(3) for r in trainer.step().finished]
    return root / "j-1", result


def test_what_the_trainer_writes_the_readers_read(finished, tmp_path):
    out, result = finished
    assert sorted(p.name for p in out.iterdir()) == sorted(TRAINER_OUTPUTS)  # no checkpoints left
    assert completed_result(out, "j-1") is None  # not complete before the group's result.json

    write_result(out, result)
    record = completed_result(out, "j-1")
    assert (record["job_id"], record["steps"], record["metrics"]) == ("j-1", 3, result.metrics)
    assert completed_result(out, "j-2") is None  # another job's folder is not this one's result

    folder = load_result(out, "j-1")
    assert folder.root == out and folder.keep is None  # local: read in place
    assert folder.metrics == result.metrics and set(folder.metrics) >= {"eval_loss", "eval_perplexity"}
    assert [r["step"] for r in folder.history] == [1, 2, 3]
    assert [p.name for p in folder.files()] == ["metrics.json", "history.jsonl", "data_report.txt", RESULT_FILE]
    assert (folder.adapter / "adapter_model.safetensors").is_file() and folder.prefix.is_dir()


def test_readers_refuse_what_is_incomplete_and_drop_what_is_not_a_number(finished, tmp_path):
    out, _ = finished
    copy = tmp_path / "j-1"
    shutil.copytree(out, copy)
    (copy / "metrics.json").write_text(json.dumps({"eval_loss": 1.5, "bad": math.nan, "flag": True, "n": 2}))
    assert load_result(copy, "j-1").metrics == {"eval_loss": 1.5, "n": 2.0}

    shutil.rmtree(copy / "prefix")
    (copy / "history.jsonl").unlink()
    with pytest.raises(ResultError, match="lacks prefix/prefix_config.json, prefix/prefix_encoder.safetensors, hist"):
        load_result(copy, "j-1")
    with pytest.raises(ResultError, match="job j-9: it has no result_dir"):
        load_result(None, "j-9")


def test_finite():
    assert [finite(v) for v in (1, 2.5, -0.0, math.inf, math.nan, True, "1", None)] == [
        1.0,
        2.5,
        -0.0,
        None,
        None,
        None,
        None,
        None,
    ]
