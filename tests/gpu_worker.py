"""One-rank worker group run as a subprocess by tests/test_gpu.py: the path the orchestrator's actors take.

    python tests/gpu_worker.py '{"folder": ..., "work": ..., "run": "fp32", "device": "cuda",
                                 "dtype": "float32", "stage": 0, "steps": 6}'

It hosts the rendezvous (`host_rendezvous`), joins a one-rank group (`GroupChannel.join`, so NCCL on a GPU,
gloo on the CPU), loads the base through `channel.load` (ZeRO stage 0 or 3) and trains the tasks of TASKS
through the returned `ReplicatedTrainer` until they finish; each task's prefix lands in
<work>/<run>/<task>/prefix. Prints one line "RESULT <json>": the process-group backend, where the model,
its parameters' storage and each prefix live and in which dtype, the per-step loss of every task, and the
ZeRO shard sizes. A process can initialise a process group once, hence a subprocess per run.

TF32 is off: fp32 matrix products on the GPU then round like fp32 ones on the CPU (to ~1e-6 relative).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from tests.tiny import tiny_task  # noqa: E402
from workers.data import DataSettings  # noqa: E402
from workers.trainer import TaskConfig  # noqa: E402

# name: (data kind for tests.tiny.write_task, prefix length, learning rate, examples per step). With the
# micro-batch of 3 rows below, each step cuts 9 rows into 3 micro-batches, two of them holding both tasks.
TASKS = {"rev": ("reverse", 5, 2e-2, 4), "nxt": ("next", 8, 3e-2, 5)}
MICRO_BATCH = 3


def task_config(work: Path, run: str, name: str, steps: int) -> TaskConfig:
    """The TaskConfig of task `name` for the run `run` (results under work/run/name). Evaluates at step 4
    and at the end, checkpoints at step 3: prefix, optimizer state and RNG leave the device and are written."""
    _, p, lr, examples = TASKS[name]
    data = DataSettings(train=str(work / f"{name}.jsonl"), input_column="input", target_column="target", max_length=40)
    return tiny_task(
        name,
        data,
        str(work / run / name),
        prefix_length=p,
        steps=steps,
        examples_per_step=examples,
        learning_rate=lr,
        eval_every=4,
        checkpoint_every=3,
        seed=3,
    )


def write_data(work: Path) -> None:
    """The JSONL files of TASKS under `work` (tests.tiny.write_task)."""
    from tests.tiny import write_task

    for name, (kind, *_) in TASKS.items():
        write_task(work / f"{name}.jsonl", kind)


def where(tensor: torch.Tensor) -> dict[str, str]:
    """{"device": "cuda:0", "dtype": "float32"}: where a tensor lives, as the test compares it."""
    return {"device": str(tensor.device), "dtype": str(tensor.dtype).removeprefix("torch.")}


def main(spec: dict) -> dict:
    import torch.distributed as dist

    from workers.models import BaseModelRef
    from workers.ranks import GroupChannel, RankSettings
    from workers.zero import ZeroSettings, host_rendezvous

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    work = Path(spec["work"])
    stage = int(spec.get("stage", 0))
    settings = RankSettings(
        world=1,
        device=spec["device"],
        micro_batch_size=MICRO_BATCH,
        zero=ZeroSettings(stage=stage, persistence_threshold=0 if stage == 3 else None),
    )
    store, port = host_rendezvous("127.0.0.1", 1)
    channel = GroupChannel.join(0, settings, ("127.0.0.1", port), store=store)
    replicated = channel.load(BaseModelRef(kind="path", location=spec["folder"], dtype=spec["dtype"]))
    trainer = replicated.trainer
    for name in TASKS:
        replicated.add_task(task_config(work, spec["run"], name, int(spec["steps"])))
    param = next(trainer.model.parameters())
    storage = param.ds_tensor if hasattr(param, "ds_id") else param  # ZeRO-3: the rank's partition
    result = {
        "backend": str(dist.get_backend()),
        "group_device": str(channel.device),
        "trainer_device": str(trainer.device),
        "param": where(storage),
        "zero3_partitioned": hasattr(param, "ds_id"),
        "shard": [channel.shard.local_elements, channel.shard.total_elements],
        "prefixes": {t: where(trainer.tasks[t].encoder.prompt_embeddings()) for t in TASKS},
        "compile_note": trainer.compile_note,
        "losses": {t: [] for t in TASKS},
        "eval_loss": {},
    }
    while replicated.active:
        report = replicated.step()
        for task_id, progress in report.progress.items():
            result["losses"][task_id].append(progress.loss)
        for finished in report.finished:
            result["eval_loss"][finished.task_id] = finished.metrics["eval_loss"]
    result["peak_memory_bytes"] = report.peak_memory_bytes
    dist.destroy_process_group()
    return result


if __name__ == "__main__":
    print("RESULT " + json.dumps(main(json.loads(sys.argv[1]))), flush=True)
