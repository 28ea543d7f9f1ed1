"""Where a rank's tensors live, how many threads it runs, and how its collectives travel: decided here.

A worker rank is one process with at most one GPU of its own (Ray gives an actor that reserves a GPU that
GPU as device 0 and hides the others). `Placement.detect` turns that into:

- `device`: cuda:0 when the process sees a GPU, else cpu. The base model (ZeRO stage 0/2), the prefixes,
  their optimizer state and every micro-batch live there; ZeRO-3 partitions go to the same device.
- `backend`: the process-group backend, "cpu:gloo,cuda:nccl" on a GPU (NCCL for device tensors, gloo for
  anything on the CPU), "gloo" on a CPU host.
- `threads`: on a CPU host, torch's intra-op threads = the CPUs the rank reserved from Ray (at least 1),
  set explicitly rather than left to whatever OMP_NUM_THREADS the process inherited.

Every collective of the trainer and of the rank protocol goes through `Collectives`, which puts the tensor on
the group's collective device (the rank's device) and hands the result back where the tensor came from;
nothing else in `workers/` or `orchestrator/` calls `torch.distributed`'s collectives.

    place = Placement.detect(cpus=4)           # Placement(device=cpu, threads=4) on a CPU host
    place.apply()                              # torch.set_num_threads(4); torch.cuda.set_device on a GPU
    coll = Collectives(place.device)           # after torch.distributed.init_process_group(place.backend, ...)
    coll.all_reduce(torch.tensor([1.0]))       # -> tensor([world]) on the caller's device
"""

from __future__ import annotations

import os
import resource
import threading
from dataclasses import dataclass

import torch

DEVICE_CHOICES = ("auto", "cpu", "cuda")


def resolve_device(name: str | None = "auto") -> torch.device:
    """'auto' (or None): the first visible GPU, else the CPU; 'cpu'; 'cuda' or 'cuda:N'.

    Raises ValueError naming the choice and what is accepted, or when CUDA is asked for and absent."""
    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r}: this machine has no CUDA device visible; accepted here: auto, cpu")
        index = 0 if name == "cuda" else _index(name)
        if index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s) visible")
        return torch.device("cuda", index)
    raise ValueError(f"device {name!r}; accepted: auto, cpu, cuda, cuda:N")


def _index(name: str) -> int:
    try:
        index = int(name.split(":", 1)[1])
    except ValueError:
        raise ValueError(f"device {name!r}; accepted: auto, cpu, cuda, cuda:N") from None
    if index < 0:
        raise ValueError(f"device {name!r}: the index must be >= 0")
    return index


@dataclass(frozen=True)
class Placement:
    """One rank's device and thread count (see the module docstring)."""

    device: torch.device
    threads: int | None = None
    """torch intra-op threads on a CPU host; None leaves torch's own choice."""

    @classmethod
    def detect(cls, cpus: float | None = None, device: str | None = "auto") -> Placement:
        """The rank's placement: `device` resolved ('auto': the GPU this process sees, else CPU) and, on
        a CPU, `cpus` (the CPUs the rank reserved, at least 1) as its thread count."""
        dev = resolve_device(device)
        threads = max(1, int(cpus)) if cpus and dev.type == "cpu" else None
        return cls(dev, threads)

    @property
    def backend(self) -> str:
        """The process-group backend for this device: NCCL carries device tensors, gloo the CPU's."""
        return "cpu:gloo,cuda:nccl" if self.device.type == "cuda" else "gloo"

    def apply(self) -> None:
        """Make this process use the placement: the current CUDA device, or the CPU thread count."""
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if self.threads:
            torch.set_num_threads(self.threads)
            os.environ["OMP_NUM_THREADS"] = str(self.threads)  # for processes this one starts


class Collectives:
    """The worker group's collectives, every one on `device` (the group's collective device).

    A tensor from another device is copied there and the result copied back into it; each call returns
    the reduced tensor on the caller's device. Object broadcasts (rank 0's operations) are pickled into a
    tensor on the same device. `passing` is true on the calling thread while a collective of this class
    runs: the test that intercepts `torch.distributed` reads it to prove no collective bypasses the class.
    """

    _local = threading.local()

    def __init__(self, device: torch.device | str, dist=None):
        import torch.distributed as torch_dist

        self.dist = dist or torch_dist
        self.device = torch.device(device)
        self.rank = self.dist.get_rank()
        self.world = self.dist.get_world_size()

    @property
    def deepspeed_backend(self) -> str:
        """The name DeepSpeed's communication layer is told (it reuses the process group `init_group` made)."""
        return "nccl" if self.device.type == "cuda" else "gloo"

    @classmethod
    def passing(cls) -> bool:
        return getattr(cls._local, "passing", False)

    def _run(self, fn, *args, **kwargs):
        Collectives._local.passing = True
        try:
            return fn(*args, **kwargs)
        finally:
            Collectives._local.passing = False

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Reduce `tensor` over the group in place ('sum', 'min' or 'max'); returns it."""
        ops = {"sum": self.dist.ReduceOp.SUM, "min": self.dist.ReduceOp.MIN, "max": self.dist.ReduceOp.MAX}
        if op not in ops:
            raise ValueError(f"reduce op {op!r}; accepted: {', '.join(ops)}")
        moved = tensor if tensor.device == self.device else tensor.to(self.device)
        self._run(self.dist.all_reduce, moved, op=ops[op])
        if moved is not tensor:
            tensor.copy_(moved)
        return tensor

    def all_reduce_many(self, tensors: list[torch.Tensor]) -> None:
        """Sum several tensors of one dtype over the group with one collective (flattened), in place."""
        if not tensors:
            return
        flat = torch.cat([t.detach().reshape(-1).to(self.device) for t in tensors])
        self._run(self.dist.all_reduce, flat, op=self.dist.ReduceOp.SUM)
        offset = 0
        for t in tensors:
            n = t.numel()
            t.copy_(flat[offset : offset + n].view_as(t))
            offset += n

    def broadcast_object(self, obj=None, src: int = 0):
        """Rank `src`'s `obj` on every rank (pickled; for the operations rank 0 sends)."""
        box = [obj]
        self._run(self.dist.broadcast_object_list, box, src=src, device=self.device)
        return box[0]

    def barrier(self) -> None:
        """Wait for every rank: a one-element all-reduce on the collective device (a backend-neutral
        barrier: NCCL's own needs the device ids, gloo's does not)."""
        self.all_reduce(torch.zeros(1, device=self.device))

    def all_true(self, ok: bool) -> bool:
        """True on every rank if `ok` was true on every rank (an admission vote)."""
        return bool(self.all_reduce(torch.tensor([1 if ok else 0], dtype=torch.int32), op="min").item())


def out_of_memory(coll: Collectives | None, run, *args) -> str | None:
    """Run `run(*args)`; None when it completed on every rank, else why it did not: it ran out of memory
    (torch.OutOfMemoryError on a device, MemoryError on the CPU) here, or on another rank of the group (the
    ranks agree by an all-reduce, so all of them return the same verdict). What the failed run held is
    freed before this returns (its frames are gone; the CUDA cache is emptied). Under ZeRO-3 a forward
    gathers the base weights collectively, layer by layer: a rank that fails inside one leaves its peers
    waiting in the next gather until the group's timeout, which no vote afterwards can undo.

        error = out_of_memory(coll, model_step, batch)   # "OutOfMemoryError: CUDA out of memory. ..." or None
    """
    error = None
    try:
        run(*args)
    except (torch.OutOfMemoryError, MemoryError) as e:
        error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no detail'}"
    failed = not coll.all_true(error is None) if coll else error is not None
    if not failed:
        return None
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    return error or "out of memory on another rank of the group"


def peak_memory_bytes() -> int:
    """Peak resident memory of this process (CPU) or peak device memory (CUDA)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
