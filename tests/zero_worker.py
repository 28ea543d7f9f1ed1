"""One rank of a ZeRO-3 worker group, run as a subprocess by tests/test_zero.py.

argv: rank world port model_folder work_dir mode   (mode: together | join)
Prints "SHARD <local> <total>" and writes each task's result under work_dir/<mode>-w<world>/<task>.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.tiny import tiny_task  # noqa: E402
from workers.data import DataSettings  # noqa: E402
from workers.models import BaseModelRef  # noqa: E402
from workers.trainer import MultiTaskTrainer  # noqa: E402
from workers.zero import ZeroSettings, init_group, load_group_model  # noqa: E402

# name: (prefix length, learning rate, examples per step); "one" has a single row per step, so on two
# ranks one of them has none of its rows in a step.
TASKS = {"rev": (5, 2e-2, 5), "nxt": (8, 3e-2, 5), "one": (3, 1e-2, 1)}


def config(work, mode, world, name, steps=8):
    p, lr, examples = TASKS[name]
    data = DataSettings(train=str(work / f"{name}.jsonl"), input_column="input", target_column="target", max_length=40)
    return tiny_task(
        name,
        data,
        str(work / f"{mode}-w{world}" / name),
        prefix_length=p,
        steps=steps,
        examples_per_step=examples,
        learning_rate=lr,
        eval_every=4,
        checkpoint_every=100,
        seed=3,
    )


def main():
    rank, world, port = map(int, sys.argv[1:4])
    folder, work, mode = sys.argv[4], Path(sys.argv[5]), sys.argv[6]
    coll = init_group(rank, world, "127.0.0.1", port)
    import torch.distributed as dist

    model, tok, info = load_group_model(
        BaseModelRef(kind="path", location=folder), ZeroSettings(stage=3, persistence_threshold=0), coll
    )
    print(f"SHARD {info.local_elements} {info.total_elements}", flush=True)
    trainer = MultiTaskTrainer(model, tok, micro_batch_size=3, collectives=coll, device=coll.device)
    names = list(TASKS) if mode == "together" else ["rev"]
    for name in names:
        trainer.add_task(config(work, mode, world, name))
    step = 0
    while trainer.active:
        trainer.step()
        step += 1
        if mode == "join" and step == 3:
            trainer.add_task(config(work, mode, world, "nxt"))  # admitted mid-run
    if rank == 0:
        print("DONE " + json.dumps(step), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
