"""Job storage (`workers/storage.py`): the same contract on a local folder and on a real S3-compatible server
(moto's, on 127.0.0.1): checkpoints visible only once complete, the previous one kept until then, durable
local writes, exact resume through S3 with data read from S3, and errors that name the setting."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from jobs.spec import JobSpec, SpecError, parse_spec
from orchestrator.cli import main
from orchestrator.config import OrchestratorConfig
from tests.ports import free_port
from tests.s3 import CREDENTIALS, s3_server
from tests.tiny import char_tokenizer, tiny_model, tiny_task, write_task
from workers.data import DataSettings
from workers.formats import load_prefix
from workers.storage import CheckpointError, JobStorage, StorageError, fetch
from workers.trainer import MultiTaskTrainer, TaskConfig


@pytest.fixture(scope="module")
def s3():
    with s3_server() as server:
        yield server


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path):
    if request.param == "local":
        return JobStorage.open(tmp_path / "storage")
    return JobStorage.open(request.getfixturevalue("s3").uri(f"t/{tmp_path.name}"))


def stage(folder: Path, step: int) -> Path:
    """A checkpoint-shaped local folder whose bytes depend on the step."""
    (folder / "prefix").mkdir(parents=True, exist_ok=True)
    (folder / "prefix" / "w.bin").write_bytes(bytes([step % 256]) * 1000)
    (folder / "state.json").write_text(json.dumps({"step": step}))
    return folder


# ---- the contract, local and S3 -----------------------------------------------------------------------


def test_checkpoints_small_files_and_uploads(storage, tmp_path):
    job = storage.child("jobs", "j-1")
    assert job.complete_checkpoints() == []
    for step in (5, 10, 15):
        job.save_checkpoint(stage(tmp_path / f"s{step}", step), step)
    newest, previous = job.complete_checkpoints()  # older ones are removed; two are kept
    assert newest.startswith("step-000000015-") and previous.startswith("step-000000010-")
    manifest = job.download_checkpoint(newest, tmp_path / "got")
    assert manifest["step"] == 15 and set(manifest["files"]) == {"prefix/w.bin", "state.json"}
    assert (tmp_path / "got" / "prefix" / "w.bin").read_bytes() == bytes([15]) * 1000

    job.write_text("result.json", '{"job_id": "j-1"}')
    assert json.loads(job.read_text("result.json")) == {"job_id": "j-1"} and job.exists("result.json")
    with pytest.raises(FileNotFoundError):
        job.read_text("nothing.json")
    with pytest.raises(StorageError, match="more than 10 bytes; nothing stored"):
        job.put_stream("uploads/big.jsonl", open(tmp_path / "s5" / "prefix" / "w.bin", "rb"), max_bytes=10)
    assert not job.exists("uploads/big.jsonl")
    uri = job.put_stream("uploads/ok.jsonl", open(tmp_path / "s5" / "state.json", "rb"))
    assert uri == job.child("uploads", "ok.jsonl").uri and job.read_text("uploads/ok.jsonl") == '{"step": 5}'

    job.delete_checkpoints()
    assert job.complete_checkpoints() == [] and job.exists("result.json")


def test_a_crash_before_the_manifest_leaves_the_previous_checkpoint(storage, tmp_path, monkeypatch):
    job = storage.child("jobs", "j-2")
    first = job.save_checkpoint(stage(tmp_path / "a", 5), 5)

    class Crash(BaseException):
        pass

    def crash(self, name, manifest):
        raise Crash()

    with monkeypatch.context() as m:
        m.setattr(JobStorage, "_write_manifest", crash)
        with pytest.raises(Crash):
            job.save_checkpoint(stage(tmp_path / "b", 10), 10)
    assert any(rel.startswith("step-000000010-") for rel in job.listing("checkpoints"))  # uploaded, not complete
    assert job.complete_checkpoints() == [first]
    assert job.download_checkpoint(first, tmp_path / "got")["step"] == 5
    third = job.save_checkpoint(stage(tmp_path / "c", 15), 15)  # removes the incomplete leftover
    assert {rel.split("/")[0] for rel in job.listing("checkpoints")} == {first, third}


def test_a_changed_file_fails_its_manifest_check(tmp_path):
    job = JobStorage.open(tmp_path / "storage")
    name = job.save_checkpoint(stage(tmp_path / "a", 5), 5)
    (tmp_path / "storage" / "checkpoints" / name / "state.json").unlink()
    with pytest.raises(CheckpointError, match="state.json is missing"):
        job.download_checkpoint(name, tmp_path / "got")
    (tmp_path / "storage" / "checkpoints" / name / "prefix" / "w.bin").write_bytes(b"\0" * 1000)
    with pytest.raises(CheckpointError, match="prefix/w.bin does not match its manifest: its sha256 differs"):
        job.download_checkpoint(name, tmp_path / "got2")


def test_local_checkpoints_fsync_every_file_and_folder_before_the_manifest(tmp_path, monkeypatch):
    synced: list[str] = []
    real = os.fsync

    def spy(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    job = JobStorage.open(tmp_path / "storage")
    name = job.save_checkpoint(stage(tmp_path / "a", 5), 5)
    folder = tmp_path / "storage" / "checkpoints" / name
    [manifest] = [i for i, path in enumerate(synced) if Path(path).name.startswith(".COMPLETE.tmp-")]  # then renamed
    before = set(synced[:manifest])
    assert {str(folder / "prefix" / "w.bin"), str(folder / "state.json")} <= before  # the files
    assert {str(folder / "prefix"), str(folder), str(folder.parent)} <= before  # their folders' entries
    assert str(folder) in synced[manifest + 1 :]  # the manifest's own rename


def test_fetch_keeps_a_remote_file_in_the_cache_until_it_changes(s3, tmp_path):
    data = JobStorage.open(s3.uri("data"))
    data.write_text("t.jsonl", '{"a": 1}\n')
    first = fetch(data.child("t.jsonl").uri, tmp_path / "cache")
    assert first.read_text() == '{"a": 1}\n' and first.name == "t.jsonl"
    assert fetch(data.child("t.jsonl").uri, tmp_path / "cache") == first
    data.write_text("t.jsonl", '{"a": 2, "b": 3}\n')
    second = fetch(data.child("t.jsonl").uri, tmp_path / "cache")
    assert second != first and second.read_text() == '{"a": 2, "b": 3}\n'
    assert fetch(tmp_path / "cache", tmp_path / "x") == tmp_path / "cache"  # a local path, as it is


def test_a_spec_may_name_its_data_by_storage_uri(s3, tmp_path):
    """Validation reads the columns through the storage layer; a spec sent to the server may not name one."""
    data = JobStorage.open(s3.uri(f"specdata/{tmp_path.name}"))
    data.write_bytes("qa.csv", b"question,answer\nwhy,because\n")
    spec = {
        "name": "qa",
        "base_model": {"builtin": "smollm2-135m"},
        "training": {"steps": 2},
        "data": {"train": data.child("qa.csv").uri, "template": "Q: {question}\nA:", "target_column": "answer"},
    }
    parsed = parse_spec(spec, base_dir=tmp_path)
    assert parsed.data.train == data.child("qa.csv").uri  # kept as written, never made a local path
    assert JobSpec.from_dict(parsed.to_dict()).data.train == parsed.data.train

    wrong = spec | {"data": spec["data"] | {"target_column": "reply", "validation": data.child("gone.csv").uri}}
    with pytest.raises(SpecError) as e:
        parse_spec(wrong, base_dir=tmp_path)
    text = str(e.value)
    assert "data.target_column: column 'reply' is not in data.train" in text and "question, answer" in text
    assert "data.validation: no such file" in text and "gone.csv" in text
    with pytest.raises(SpecError, match="data.train: a storage URI is not accepted in a spec sent to the server"):
        parse_spec(spec, base_dir=tmp_path, data_root=tmp_path)
    with pytest.raises(SpecError, match="base_model.path: a local folder is expected here, not a URI"):
        parse_spec(spec | {"base_model": {"path": data.uri}}, base_dir=tmp_path)


# ---- errors -----------------------------------------------------------------------------------------------


def test_errors_name_the_setting_and_what_is_accepted_never_a_secret(s3, tmp_path, monkeypatch, capsys):
    messages = []
    for uri, expected in [
        ("gs://bucket/x", "the scheme 'gs' is not accepted; accepted: a local path"),
        ("s3://AKIAFAKE:hunter2-secret@bucket/x", "credentials do not belong in the URI"),
        ("s3://bucket/x?secret_key=hunter2-secret", "unknown option(s) secret_key; accepted options: region"),
        ("s3://Bad_Bucket/x", "is not a bucket name"),
    ]:
        with pytest.raises(StorageError) as e:
            JobStorage.open(uri)
        assert str(e.value).startswith("storage: ") and expected in str(e.value), str(e.value)
        messages.append(str(e.value))
    with pytest.raises(ValueError, match="storage: 'gs://bucket/x': the scheme 'gs' is not accepted"):
        OrchestratorConfig.from_env(home=tmp_path, storage="gs://bucket/x")

    closed = f"s3://{s3.bucket}/x?endpoint_override=http://127.0.0.1:{free_port()}"
    with pytest.raises(StorageError, match=r"cannot reach http://127\.0\.0\.1:\d+: check endpoint_override") as e:
        JobStorage.open(closed).check()
    messages.append(str(e.value))
    with pytest.raises(StorageError, match="the bucket 'no-such-bucket' does not exist") as e:
        JobStorage.open(f"s3://no-such-bucket/x?endpoint_override={s3.endpoint}").check()
    messages.append(str(e.value))
    # The commands that train check the storage first, and say what failed.
    assert main(["--home", str(tmp_path / "h"), "--storage", closed, "run"]) == 1
    err = capsys.readouterr().err
    assert "prefixd run: error: storage: cannot look up the bucket of" in err and "cannot reach" in err
    messages.append(err)

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.aws either
    with pytest.raises(StorageError, match="no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"):
        JobStorage.open(s3.uri("x")).check()
    for text in messages:
        assert "hunter2" not in text and CREDENTIALS["AWS_SECRET_ACCESS_KEY"] not in text, text


# ---- the trainer through S3 -------------------------------------------------------------------------------


def rev_task(out_dir: str, train: str, steps: int = 12) -> TaskConfig:
    data = DataSettings(train=train, input_column="input", target_column="target", max_length=40)
    return tiny_task(
        "rev",
        data,
        out_dir,
        prefix_length=5,
        task_id="s3-task",
        learning_rate=3e-2,
        schedule="cosine",
        steps=steps,
        examples_per_step=4,
        seed=3,
        eval_every=6,
        checkpoint_every=5,
    )


def train(config: TaskConfig, cache: Path, until: int | None = None):
    """Train (from its checkpoint, if any) until the end or `until` steps; (first step, result or None)."""
    trainer = MultiTaskTrainer(
        tiny_model("llama"),
        char_tokenizer(),
        micro_batch_size=8,
        data_cache_dir=str(cache / "data"),
        scratch_dir=str(cache / "scratch"),
    )
    start = trainer.add_task(config).step
    while trainer.active and (until is None or trainer.tasks[config.task_id].step < until):
        finished = trainer.step().finished
        if finished:
            return start, finished[0]
    return start, None


def prefix_from(uri: str, tmp: Path) -> torch.Tensor:
    local = JobStorage.open(uri).download("", tmp / "prefix")
    return load_prefix(local)[1].prompt_embeddings().detach()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The task trained start to end on local disk: the prefix every resumed run must reproduce."""
    tmp = tmp_path_factory.mktemp("alone")
    _, result = train(rev_task(str(tmp / "out"), write_task(tmp / "rev.jsonl", "reverse", seed=5)), tmp)
    return load_prefix(result.prefix_dir)[1].prompt_embeddings().detach()


def test_resume_through_s3_falls_back_past_an_unusable_checkpoint(s3, uninterrupted, tmp_path, monkeypatch):
    """Data read from S3; a crash between writing the step-10 checkpoint and marking it complete, and a
    step-5 checkpoint damaged afterwards: the run resumes from the one before, to the same prefix."""
    data = JobStorage.open(s3.uri(f"data/{tmp_path.name}"))
    data.write_bytes("rev.jsonl", Path(write_task(tmp_path / "rev.jsonl", "reverse", seed=5)).read_bytes())
    job = JobStorage.open(s3.uri(f"jobs/{tmp_path.name}"))
    config = rev_task(job.uri, data.child("rev.jsonl").uri)

    class Crash(BaseException):
        pass

    real = JobStorage._write_manifest

    def crash_at_step_10(self, name, manifest):
        if manifest["step"] == 10:
            raise Crash()
        real(self, name, manifest)

    monkeypatch.setattr(JobStorage, "_write_manifest", crash_at_step_10)
    with pytest.raises(Crash):
        train(config, tmp_path / "node-a")
    monkeypatch.undo()
    [step5] = job.complete_checkpoints()
    assert step5.startswith("step-000000005-")

    start, _ = train(config, tmp_path / "node-b", until=11)  # resumes at 5, checkpoints 10, stops at 11
    assert start == 5
    step10, step5_again = job.complete_checkpoints()
    assert step10.startswith("step-000000010-") and step5_again == step5
    job.write_bytes(f"checkpoints/{step10}/state.json", b"{}")  # damaged: no longer its manifest's bytes

    start, result = train(config, tmp_path / "node-c")
    assert start == 5  # the damaged newest one was passed over
    assert result.prefix_dir == job.child("prefix").uri and job.complete_checkpoints() == []
    assert (prefix_from(result.prefix_dir, tmp_path) - uninterrupted).abs().max().item() < 1e-6
    shutil.rmtree(tmp_path, ignore_errors=True)
