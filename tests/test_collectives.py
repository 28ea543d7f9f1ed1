"""Every collective of the trainer and of the group's rank protocol goes through `workers.devices.Collectives`.

A two-rank gloo group (two processes: tests/collectives_worker.py) runs the real code with every
collective entry point of torch.distributed intercepted (`collectives_worker.Interceptor`): rank 0 drives a
`ReplicatedTrainer` (admission votes, steps, evaluations, a refused task, a cancel, a task with one row per
step), rank 1 runs `workers.ranks.follow`. No collective may run outside `Collectives` or with a tensor off
its device; the run must make plenty of them and train exactly like one process. Then both ranks make
collectives straight through torch.distributed, which the interceptor must catch. A 1-rank group checks
`Collectives` itself, and a scan of the sources finds any collective named outside workers/devices.py.
"""

from __future__ import annotations

import ast
import json
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from tests.collectives_worker import MICRO_BATCH, MODULE_COLLECTIVES, PROBES, Interceptor, drive, write_data
from tests.tiny import save_tiny_base

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("collectives_worker.py")
TIMEOUT_S = 240


def _env(cache: Path) -> dict:
    env = dict(
        os.environ,
        HF_DATASETS_CACHE=str(cache),
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
        PYTHONPATH=str(ROOT),
    )
    env.pop("TORCH_DIST_INIT_BARRIER", None)
    return env


def _port_of(proc: subprocess.Popen, deadline: float, log: Path) -> int:
    """The port rank 0 prints once it hosts the rendezvous store (its stdout is drained by a thread from
    then on, so it never blocks on a full pipe)."""
    lines: queue.Queue = queue.Queue()

    def drain():
        for line in proc.stdout:
            lines.put(line)
        lines.put("")

    threading.Thread(target=drain, daemon=True).start()
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1.0)
        except queue.Empty:
            continue
        if line.startswith("PORT "):
            return int(line.split()[1])
        if not line:  # rank 0 ended before hosting
            break
    proc.kill()
    pytest.fail(f"rank 0 gave no port:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def group_run(tmp_path_factory):
    """Both ranks' reports of one intercepted group run, and the work folder."""
    work = tmp_path_factory.mktemp("collectives")
    folder = save_tiny_base(work / "tiny-llama")
    write_data(work)
    reports = [work / f"rank{r}.json" for r in range(2)]
    logs = [work / f"rank{r}.log" for r in range(2)]
    deadline = time.monotonic() + TIMEOUT_S
    procs = []
    try:
        with open(logs[0], "w") as err0, open(logs[1], "w") as err1:
            procs.append(
                subprocess.Popen(
                    [sys.executable, str(WORKER), "rank0", str(folder), str(work), str(reports[0])],
                    stdout=subprocess.PIPE,
                    stderr=err0,
                    text=True,
                    cwd=ROOT,
                    env=_env(work / "cache0"),
                )
            )
            port = _port_of(procs[0], deadline, logs[0])
            procs.append(
                subprocess.Popen(
                    [sys.executable, str(WORKER), "rank1", str(port), str(reports[1])],
                    stdout=err1,
                    stderr=err1,
                    text=True,
                    cwd=ROOT,
                    env=_env(work / "cache1"),
                )
            )
            # until both end, one fails (its peer would wait for it up to the group's timeout), or time is up
            while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
                if any(p.poll() not in (None, 0) for p in procs):
                    break
                time.sleep(0.2)
    finally:
        codes = [p.poll() for p in procs]
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for r, code in enumerate(codes):
        assert code is not None, f"the group did not finish in {TIMEOUT_S} s:\n" + "\n".join(
            log.read_text()[-2000:] for log in logs
        )
        assert code == 0, f"rank {r} failed:\n{logs[r].read_text()[-4000:]}"
    return [json.loads(r.read_text()) for r in reports], work, folder


def test_every_collective_of_the_group_goes_through_collectives(group_run):
    reports, work, folder = group_run
    for rep in reports:
        r = rep["rank"]
        assert rep["violations"] == [], f"rank {r}: collectives bypassing Collectives: {rep['violations']}"
        # the run really went through the group's collectives, and the interceptor saw every one of them
        assert rep["calls"] >= 25 and rep["passing_calls"] == rep["calls"], rep["by_name"]
        # rank 0's operations: load, 5 adds (one refused), noop, 6 steps (the last with nothing active),
        # remove, stop
        assert rep["by_name"].get("dist.broadcast_object_list") == 15, rep["by_name"]
        assert rep["by_name"].get("dist.all_reduce", 0) >= 15, rep["by_name"]  # votes, sums, gradients, evals
        assert rep["setup_calls"] == [], rep["setup_calls"]  # init_process_group itself made no collective
        assert {
            "torch.distributed.all_reduce",
            "torch.distributed.distributed_c10d.broadcast",
            "ProcessGroup.allreduce",
            "Backend.allreduce",
        } <= set(rep["wrapped"])
        print(f"rank {r}: {rep['calls']} collectives, all through Collectives: {rep['by_name']}")
    # both ranks made the same collectives (lockstep) and followed every step
    assert reports[0]["by_name"] == reports[1]["by_name"]
    group = reports[0]["result"]
    assert reports[1]["result"]["steps"] == 6
    assert group["coll_device"] == "cpu"
    assert group["finished"] == ["one", "rev"]
    assert group["refused"] and "missing.jsonl" in group["refused"]
    # rank 1 alone ran out of memory on the huge task's rows: both ranks agreed, retried per task, and
    # failed that task alone (rank 0 says what it knows); the others trained on (next test: as without it)
    assert list(group["failed"]) == ["huge"]
    assert group["failed"]["huge"].startswith("out of memory on its own rows at step 1 (4 rows of up to")
    assert group["failed"]["huge"].endswith(": out of memory on another rank of the group")


def test_the_intercepted_group_trains_like_one_process(group_run):
    """The same schedule in this process, with no group: every prefix equal to 1e-5, and changed by training."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workers.trainer import MultiTaskTrainer

    reports, work, folder = group_run
    group = reports[0]["result"]
    trainer = MultiTaskTrainer(
        AutoModelForCausalLM.from_pretrained(folder),
        AutoTokenizer.from_pretrained(folder),
        micro_batch_size=2 * MICRO_BATCH,
        data_cache_dir=str(work / "cache-alone"),
    )
    alone = drive(trainer, work, "alone")
    assert alone["refused"] and alone["finished"] == group["finished"]
    for name in ("rev", "one", "nxt"):
        g_start, g_end = torch.tensor(group["start"][name]), torch.tensor(group["end"][name])
        a_start, a_end = torch.tensor(alone["start"][name]), torch.tensor(alone["end"][name])
        assert torch.equal(g_start, a_start)
        diff, moved = (g_end - a_end).abs().max().item(), (g_end - g_start).abs().max().item()
        assert diff < 1e-5, f"{name}: the group's prefix differs from one process's by {diff}"
        assert moved > 1e-3, f"{name} did not train (moved {moved})"


def test_a_collective_that_bypasses_collectives_is_caught(group_run):
    """After the group stopped, both ranks made collectives straight through torch.distributed: each probe
    (module function, the c10d module's name, a barrier, the ProcessGroup's own method) is a violation."""
    reports, _, _ = group_run
    for rep in reports:
        for probe in PROBES:
            caught = rep["probes"][probe]
            assert caught, f"rank {rep['rank']}: the bypass {probe!r} was not caught"
            assert all("outside workers.devices.Collectives" in v["reason"] for v in caught)
        assert [c["passing"] for c in rep["probe_calls"]] == [False] * len(PROBES)


# ---------------------------------------------------------------------- one rank, in this process
@pytest.fixture
def one_rank():
    """A 1-rank gloo group on 127.0.0.1 (the store rank 0 hosts, port picked by the OS), intercepted;
    destroyed afterwards so the process can hold another."""
    import torch.distributed as dist

    from workers.devices import Placement
    from workers.ranks import host_rendezvous
    from workers.zero import init_group

    assert not dist.is_initialized()
    interceptor = Interceptor("cpu").install()
    threads, environ = torch.get_num_threads(), dict(os.environ)  # init_group sets MASTER_ADDR, RANK, ...
    try:
        store, port = host_rendezvous("127.0.0.1", 1)
        coll = init_group(0, 1, "127.0.0.1", port, store=store, placement=Placement(torch.device("cpu")))
        yield coll, interceptor
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        interceptor.uninstall()
        torch.set_num_threads(threads)
        os.environ.clear()
        os.environ.update(environ)


def test_collectives_on_one_rank(one_rank):
    import torch.distributed as dist

    from workers.devices import Collectives

    coll, interceptor = one_rank
    assert (coll.rank, coll.world, coll.device) == (0, 1, torch.device("cpu"))
    x = torch.tensor([1.0, 2.0])
    out = coll.all_reduce(x)
    assert out is x and out.device == x.device and out.tolist() == [1.0, 2.0]
    assert coll.all_reduce(torch.tensor([3.0]), op="max").item() == 3.0
    a, b = torch.ones(2, 2), torch.arange(3, dtype=torch.float32)
    coll.all_reduce_many([a, b])  # in place, shapes kept
    assert a.shape == (2, 2) and torch.equal(a, torch.ones(2, 2)) and torch.equal(b, torch.arange(3.0))
    coll.all_reduce_many([])
    assert coll.all_true(True) is True and coll.all_true(False) is False
    assert coll.broadcast_object(("add", {"k": [1, 2]})) == ("add", {"k": [1, 2]})
    coll.barrier()
    with pytest.raises(ValueError, match="accepted: sum, min, max"):
        coll.all_reduce(torch.zeros(1), op="mean")
    assert not Collectives.passing()  # reset after each call, also after one that raised
    assert interceptor.violations == [] and len(interceptor.calls) == 7  # the 7 calls above that reach the group
    assert all(c["passing"] for c in interceptor.calls)
    # the interceptor's own two checks, here with one rank: a bypass, and a tensor off the device
    dist.all_reduce(torch.zeros(1))
    assert [v["name"] for v in interceptor.violations] == ["dist.all_reduce"]
    interceptor.device = torch.device("meta")  # as if the collective device were another one
    coll.all_reduce(torch.zeros(1))
    assert "not the collective device meta" in interceptor.violations[-1]["reason"]


# ---------------------------------------------------------------------- the sources
# torch.distributed's collectives (the worker intercepts the same list), and DeepSpeed's inference all-reduce
COLLECTIVE_NAMES = set(MODULE_COLLECTIVES) | {"inference_all_reduce"}
GROUP_ONLY_NAMES = {
    "allreduce",
    "allgather",
    "alltoall",
    "allreduce_coalesced",
    "alltoall_base",
    "_allgather_base",
    "allgather_into_tensor_coalesced",
    "reduce_scatter_tensor_coalesced",
}
DIST_MODULES = ("torch.distributed", "torch.distributed.distributed_c10d", "deepspeed.comm")


def collective_uses(path: Path) -> list[str]:
    """Collectives named in a source file without `Collectives`: through an alias of torch.distributed
    (or its c10d module, or DeepSpeed's comm), imported by name, through a `Collectives`' own `.dist`, or
    a ProcessGroup's own method."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    aliases: set[str] = set()
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name in DIST_MODULES and a.asname:
                    aliases.add(a.asname)
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                full = f"{node.module}.{a.name}"
                if full in DIST_MODULES:
                    aliases.add(a.asname or a.name)
                elif node.module in DIST_MODULES and a.name in COLLECTIVE_NAMES:
                    found.append(f"{path.name}:{node.lineno} imports {full}")
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        base = ast.unparse(node.value)
        if node.attr in COLLECTIVE_NAMES and (base in aliases or base in DIST_MODULES or base.endswith(".dist")):
            found.append(f"{path.name}:{node.lineno} {base}.{node.attr}")
        elif node.attr in GROUP_ONLY_NAMES:
            found.append(f"{path.name}:{node.lineno} .{node.attr}")
    return found


def test_no_source_names_a_collective_outside_collectives(tmp_path):
    # the scan finds each way of writing one
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import torch.distributed as dist\nimport torch\nfrom torch import distributed as d2\n"
        "from torch.distributed import all_gather\nimport deepspeed.comm as ds\n"
        "dist.all_reduce(t)\ntorch.distributed.barrier()\nd2.broadcast_object_list(b)\n"
        "ds.all_reduce(t)\npg.allreduce([t])\nself.coll.dist.all_gather(x, t)\n",
        encoding="utf-8",
    )
    assert len(collective_uses(probe)) == 7
    sources = [
        p
        for folder in ("workers", "orchestrator")
        for p in sorted((ROOT / folder).rglob("*.py"))
        if p != ROOT / "workers" / "devices.py"
    ]
    assert len(sources) > 10
    found = [use for p in sources for use in collective_uses(p)]
    assert found == [], "collectives that bypass workers.devices.Collectives:\n" + "\n".join(found)
