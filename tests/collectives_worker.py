"""The collective interceptor of tests/test_collectives.py, and the ranks it runs as subprocesses.

`Interceptor` replaces every collective entry point of torch.distributed (the module functions, under both
`torch.distributed` and `torch.distributed.distributed_c10d`, the functional collectives, and the methods of
the ProcessGroup and Backend classes that those functions end in) with a wrapper that records the call and
notes a violation when it is not made from inside `workers.devices.Collectives` (`Collectives.passing()` is
false on the calling thread) or when one of its tensors is not on the Collectives' device. Calls that torch
makes inside its own setup (`init_process_group`, `new_group`, `destroy_process_group`) are counted apart:
they belong to torch, not to the group's code. Each wrapper then calls the real function, so the group
keeps working and the ranks stay in step.

As a subprocess (argv[1] is the role):
    rank0 MODEL_FOLDER WORK_DIR REPORT   host the rendezvous, print "PORT <port>", drive the group (`drive`)
                                          through a ReplicatedTrainer, send ("stop",), then the bypass probes
    rank1 PORT REPORT                    `workers.ranks.follow` until stop, then the same bypass probes
Each writes a JSON report (calls, violations, probe results) to REPORT.
"""

from __future__ import annotations

import functools
import json
import sys
import threading
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.distributed.distributed_c10d as c10d  # noqa: E402

from workers.devices import Collectives  # noqa: E402  (imports nothing of torch.distributed's by name)

MODULE_COLLECTIVES = (
    "all_reduce",
    "all_reduce_coalesced",
    "all_gather",
    "all_gather_coalesced",
    "all_gather_into_tensor",
    "_all_gather_base",
    "all_gather_object",
    "gather",
    "gather_object",
    "scatter",
    "scatter_object_list",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "_reduce_scatter_base",
    "broadcast",
    "broadcast_object_list",
    "barrier",
    "monitored_barrier",
    "send",
    "recv",
    "isend",
    "irecv",
    "send_object_list",
    "recv_object_list",
    "batch_isend_irecv",
    "all_to_all",
    "all_to_all_single",
)
FUNCTIONAL_COLLECTIVES = (
    "all_reduce",
    "all_reduce_coalesced",
    "all_reduce_inplace",
    "all_gather_tensor",
    "all_gather_tensor_inplace",
    "all_gather_into_tensor_coalesced",
    "all_gather_inplace",
    "reduce_scatter_tensor",
    "reduce_scatter_tensor_coalesced",
    "reduce_scatter_tensor_inplace",
    "broadcast",
    "all_to_all_single",
    "all_to_all_inplace",
    "permute_tensor",
)
GROUP_METHODS = (
    "allreduce",
    "allreduce_coalesced",
    "broadcast",
    "reduce",
    "allgather",
    "_allgather_base",
    "allgather_coalesced",
    "allgather_into_tensor_coalesced",
    "all_gather_single",
    "gather",
    "scatter",
    "reduce_scatter",
    "_reduce_scatter_base",
    "reduce_scatter_tensor_coalesced",
    "reduce_scatter_single",
    "alltoall",
    "alltoall_base",
    "all_to_all_single",
    "send",
    "recv",
    "recv_anysource",
    "barrier",
    "monitored_barrier",
)
SETUP = ("init_process_group", "new_group", "destroy_process_group")


class Interceptor:
    """See the module docstring. `install()` before the process group exists; `uninstall()` restores all."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.phase = "run"
        self.calls: list[dict] = []  # outermost collective calls: name, phase, passing
        self.setup_calls: list[str] = []
        self.violations: list[dict] = []
        self._local = threading.local()
        self._restore: list[tuple[object, str, object]] = []
        self.wrapped: list[str] = []
        """What `install` replaced, as module.name / Class.method."""

    # ------------------------------------------------------------------ installing
    def install(self) -> Interceptor:
        import torch._C._distributed_c10d as C
        import torch.distributed._functional_collectives as funcol

        for name in MODULE_COLLECTIVES:
            self._patch_function([dist, c10d], name, f"dist.{name}", self._collective)
        for name in SETUP:
            self._patch_function([dist, c10d], name, f"dist.{name}", self._setup)
        for name in FUNCTIONAL_COLLECTIVES:
            self._patch_function([funcol], name, f"funcol.{name}", self._collective)
        for cls in (C.ProcessGroup, C.Backend):
            for name in GROUP_METHODS:
                if name in cls.__dict__:
                    self._patch_method(cls, name, f"{cls.__name__}.{name}")
        self.wrapped = sorted({f"{getattr(o, '__name__', o)}.{n}" for o, n, _ in self._restore})
        return self

    def uninstall(self) -> None:
        for owner, name, original in reversed(self._restore):
            setattr(owner, name, original)
        self._restore.clear()

    def _patch_function(self, modules, name, label, kind):
        originals = {id(getattr(m, name)): getattr(m, name) for m in modules if hasattr(m, name)}
        wrappers = {key: kind(label, fn) for key, fn in originals.items()}
        for m in modules:
            if hasattr(m, name):
                self._restore.append((m, name, getattr(m, name)))
                setattr(m, name, wrappers[id(getattr(m, name))])

    def _patch_method(self, cls, name, label):
        raw = cls.__dict__[name]  # pybind11's instancemethod: calling it with the instance first calls the method
        self._restore.append((cls, name, raw))
        setattr(cls, name, self._collective(label, raw))

    # ------------------------------------------------------------------ wrappers
    def _depth(self, key: str) -> int:
        return getattr(self._local, key, 0)

    def _setup(self, label, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            self._local.setup = self._depth("setup") + 1
            try:
                return fn(*args, **kwargs)
            finally:
                self._local.setup -= 1

        return wrapper

    def _collective(self, label, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            self.check(label, args, kwargs)
            self._local.depth = self._depth("depth") + 1
            try:
                return fn(*args, **kwargs)
            finally:
                self._local.depth -= 1

        return wrapper

    def check(self, label: str, args, kwargs) -> None:
        """Record one collective call; note what is wrong with it."""
        if self._depth("setup"):
            if not self._depth("depth"):
                self.setup_calls.append(label)
            return
        passing = Collectives.passing()
        if not self._depth("depth"):  # the outermost call: inner ones are what it is made of
            self.calls.append(dict(name=label, phase=self.phase, passing=passing))
            if not passing:
                self._violation(label, "called outside workers.devices.Collectives")
        if label.endswith("_object_list") or label.endswith("_object"):
            device = kwargs.get("device")  # the objects are pickled into tensors on `device`
            if device is not None and torch.device(device) != self.device:
                self._violation(label, f"objects pickled on {device}, not the collective device {self.device}")
            return
        for t in _tensors((args, kwargs)):
            if t.device != self.device:
                self._violation(label, f"tensor on {t.device}, not the collective device {self.device}")

    def _violation(self, label: str, reason: str) -> None:
        self.violations.append(dict(name=label, phase=self.phase, reason=reason))

    def report(self) -> dict:
        run = [c for c in self.calls if c["phase"] == "run"]
        return dict(
            calls=len(run),
            passing_calls=sum(c["passing"] for c in run),
            by_name=dict(Counter(c["name"] for c in run)),
            setup_calls=self.setup_calls,
            violations=[v for v in self.violations if v["phase"] == "run"],
            probes={p: [v for v in self.violations if v["phase"] == f"probe:{p}"] for p in PROBES},
            probe_calls=[c for c in self.calls if c["phase"] != "run"],
            wrapped=self.wrapped,
        )


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for x in obj:
            yield from _tensors(x)
    elif isinstance(obj, dict):
        for x in obj.values():
            yield from _tensors(x)


# ---------------------------------------------------------------------- bypass probes
def _probe_all_reduce(rank):
    dist.all_reduce(torch.zeros(1))


def _probe_c10d_broadcast_object_list(rank):
    c10d.broadcast_object_list(["from rank 0" if rank == 0 else None], src=0)


def _probe_barrier(rank):
    dist.barrier()


def _probe_process_group_allreduce(rank):
    c10d._get_default_group().allreduce([torch.ones(1)]).wait()


PROBES = {
    "all_reduce": _probe_all_reduce,
    "c10d.broadcast_object_list": _probe_c10d_broadcast_object_list,
    "barrier": _probe_barrier,
    "ProcessGroup.allreduce": _probe_process_group_allreduce,
}


def run_probes(interceptor: Interceptor, rank: int) -> None:
    """Collectives made straight through torch.distributed, bypassing `Collectives` (every rank makes them,
    in the same order, so they complete); each should be noted as a violation of its own phase."""
    for name, probe in PROBES.items():
        interceptor.phase = f"probe:{name}"
        probe(rank)
    interceptor.phase = "done"


# ---------------------------------------------------------------------- the group's work
# name: (data kind, prefix length, learning rate, examples per step, steps); "one" has a single row per
# step, so in each step one rank has none of its rows (and when it trains alone, one rank's share is empty).
TASKS = {"rev": ("reverse", 4, 2e-2, 4, 3), "one": ("double", 3, 1e-2, 1, 5), "nxt": ("next", 5, 3e-2, 3, 20)}
MICRO_BATCH = 2  # per rank; one process runs 2x that, so the micro-batch cuts are the same
# "huge" joins the group's run only: its rows (the longest, marked with MARK) run out of memory on rank 1
# alone (`run_out_of_memory_on_marked_rows`), so the ranks must agree that it fails; the others then end
# as in one process without it.
HUGE = ("huge", 3, 1e-2, 4, 30)
MARK = "|"


def task_config(work: Path, label: str, name: str):
    from tests.tiny import tiny_task
    from workers.data import DataSettings

    train = work / f"{name}.jsonl" if name in (*TASKS, "huge") else work / "missing.jsonl"
    p, lr, examples, steps = (TASKS | {"huge": HUGE}).get(name, ("", 3, 1e-2, 1, 2))[1:]
    data = DataSettings(train=str(train), input_column="input", target_column="target", max_length=32)
    return tiny_task(
        name,
        data,
        str(work / label / name),
        prefix_length=p,
        steps=steps,
        examples_per_step=examples,
        learning_rate=lr,
        eval_every=2,
        checkpoint_every=2,
        seed=5,
    )


def write_data(work: Path) -> None:
    from tests.tiny import write_task

    for name, (kind, *_) in TASKS.items():
        write_task(work / f"{name}.jsonl", kind, n=24)
    rows = [{"input": f"oom {MARK}{'ab' * 10}{i % 10}=", "target": "ab"} for i in range(24)]
    (work / "huge.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def run_out_of_memory_on_marked_rows() -> None:
    """This process's embeddings raise torch.OutOfMemoryError for any batch holding a MARK token: the
    device of this rank alone running out of memory on the huge task's rows."""
    from tests.tiny import char_tokenizer

    mark = char_tokenizer().convert_tokens_to_ids(MARK)

    def hook(module, args):
        if isinstance(module, torch.nn.Embedding) and (args[0] == mark).any():
            raise torch.OutOfMemoryError("simulated on rank 1")

    torch.nn.modules.module.register_module_forward_pre_hook(hook)


def drive(trainer, work: Path, label: str, send=None) -> dict:
    """The same schedule for the group (a ReplicatedTrainer on rank 0) and for one process (a trainer):
    add two tasks, step, admit a third mid-run and refuse one whose data is missing (the admission vote),
    step past the first task's end (evaluations and checkpoints on the way), cancel the third, and step
    the one-row task alone to its end. Returns the prefixes as they started and as they ended (lists). The
    group (`send` given) also has "huge", which fails in its first step (out of memory on rank 1)."""
    inner = getattr(trainer, "trainer", trainer)
    start, end = {}, {}

    def add(name):
        trainer.add_task(task_config(work, label, name))
        start[name] = inner.prefix_of(name).tolist()

    add("rev")
    add("one")
    if send:
        add("huge")
    failed = trainer.step().failed
    add("nxt")
    try:
        trainer.add_task(task_config(work, label, "bad"))
        refused = None
    except Exception as e:  # noqa: BLE001 - expected: its data file does not exist
        refused = f"{type(e).__name__}: {e}"
    if send:
        send(("noop",))
    finished = {}
    for _ in range(2):
        finished.update({r.task_id: r.prefix_dir for r in trainer.step().finished})
    end["nxt"] = inner.prefix_of("nxt").tolist()
    trainer.remove_task("nxt")
    while trainer.active:
        finished.update({r.task_id: r.prefix_dir for r in trainer.step().finished})
    trainer.step()  # nothing active: a no-op on every rank
    from workers.formats import load_prefix

    for name, folder in finished.items():
        end[name] = load_prefix(folder)[1].prompt_embeddings().detach().tolist()
    return dict(start=start, end=end, finished=sorted(finished), refused=refused, failed=failed)


def main() -> None:
    role = sys.argv[1]
    from workers.ranks import RankSettings
    from workers.zero import ZeroSettings

    settings = RankSettings(world=2, zero=ZeroSettings(stage=0), device="cpu", cpus=1, micro_batch_size=MICRO_BATCH)
    interceptor = Interceptor(settings.placement().device).install()  # before the process group exists
    from workers.ranks import GroupChannel, follow, host_rendezvous

    out: dict = {}
    if role == "rank0":
        from workers.models import BaseModelRef

        folder, work, report = sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4])
        store, port = host_rendezvous("127.0.0.1", 2)
        print(f"PORT {port}", flush=True)
        channel = GroupChannel.join(0, settings, ("127.0.0.1", port), store=store)
        ref = BaseModelRef(kind="path", location=folder)
        channel.send(("load", ref))
        trainer = channel.load(ref)
        out = drive(trainer, work, "group", send=channel.send)
        channel.send(("stop",))
        out["coll_device"] = str(channel.coll.device)
        rank = 0
    else:
        port, report = int(sys.argv[2]), Path(sys.argv[3])
        run_out_of_memory_on_marked_rows()
        out = follow(settings, 1, ("127.0.0.1", port))
        rank = 1
    run_probes(interceptor, rank)
    dist.destroy_process_group()
    interceptor.uninstall()
    report.write_text(json.dumps(dict(rank=rank, result=out, **interceptor.report())), encoding="utf-8")


if __name__ == "__main__":
    main()
