"""A ZeRO-3 worker group of 2 CPU processes (gloo) against one process: partitioning and equal results."""

import subprocess
import sys
from pathlib import Path

import pytest

from tests.ports import free_port
from tests.tiny import save_tiny_base, write_task
from workers.formats import load_prefix
from workers.trainer import MultiTaskTrainer

pytestmark = pytest.mark.slow
WORKER = Path(__file__).with_name("zero_worker.py")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    work = tmp_path_factory.mktemp("zero")
    folder = work / "tiny-llama"
    save_tiny_base(folder)
    write_task(work / "rev.jsonl", "reverse")
    write_task(work / "nxt.jsonl", "next")
    write_task(work / "one.jsonl", "double")
    return folder, work


def run_group(folder, work, world, mode):
    port = free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(r), str(world), str(port), str(folder), str(work), mode],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(world)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    return [
        [tuple(map(int, line.split()[1:])) for line in out.splitlines() if line.startswith("SHARD")][0]
        for out, _ in outs
    ]


def prefix(path):
    return load_prefix(path / "prefix")[1].prompt_embeddings().detach()


def alone(folder, work, name, steps=8):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.zero_worker import config

    tr = MultiTaskTrainer(
        AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder), micro_batch_size=3
    )
    tr.add_task(config(work, "alone", 1, name, steps))
    while tr.active:
        tr.step()
    return prefix(work / "alone-w1" / name)


def test_two_ranks_hold_half_and_train_like_one_process(setup):
    folder, work = setup
    shards2 = run_group(folder, work, 2, "together")
    shards1 = run_group(folder, work, 1, "together")
    total = shards1[0][1]
    print(f"\nbase elements per rank: W=1 {shards1[0][0]} of {total}; W=2 {[s[0] for s in shards2]} of {total}")
    assert shards1[0][0] == total
    for local, t in shards2:
        assert t == total and abs(local - total / 2) <= 0.02 * total
    for name in ("rev", "nxt", "one"):
        w2, w1 = prefix(work / "together-w2" / name), prefix(work / "together-w1" / name)
        assert (w2 - w1).abs().max() < 1e-5
        # co-tenant independence inside the sharded group: each equals its run alone, unsharded
        assert (w2 - alone(folder, work, name)).abs().max() < 1e-5


def test_task_admitted_mid_run_trains_correctly(setup):
    folder, work = setup
    run_group(folder, work, 2, "join")
    for name in ("rev", "nxt"):
        assert (prefix(work / "join-w2" / name) - alone(folder, work, name)).abs().max() < 1e-5
