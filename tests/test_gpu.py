"""The device layer on a GPU: NCCL groups, bf16 bases, ZeRO-3, compiled layers and generation on CUDA.

Tests marked `gpu` need a CUDA device and skip without one (`benchmarks/gpu_check.sh` runs them on a GPU
host: `python3 -m pytest -m gpu tests/test_gpu.py`). Each checks numbers against the CPU path, which the
rest of the suite pins down. The unmarked tests run everywhere: device choices and errors, and the one-rank
group worker on the CPU against a plain trainer (the same comparison as the GPU's, so its machinery is
tested here too).

Tolerances (every GPU run has TF32 off, so fp32 products round as fp32):
- fp32 GPU vs CPU: 1e-4 absolute on prefixes of magnitude ~3 after 6 AdamW steps (per-op rounding ~1e-7
  relative; Adam's normalised update passes such differences on unamplified), 1e-5 relative on losses.
- ZeRO-3 vs stage 0, same device: 1e-5 (only the gathering differs; on the CPU they agree to 2e-7).
- bf16 base vs fp32 base: bf16 keeps 8 significant bits (rounding 2^-9 ~ 0.2% per value). On the CPU the
  bf16 run's prefix updates (final - initial) differ from fp32's by 0.4-0.5% (relative L2) and its losses by
  under 0.01%; the GPU's kernels (cuBLAS, fused attention) round differently, so the bounds are 10x and
  100x that: 5% on the updates, 1% on each step's loss. A prefix rounded to bf16 anywhere in the update
  (it must stay fp32) moves each element by ~0.4% of |prefix| ~ 0.01, about 10% of the update: caught.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.gpu_worker import MICRO_BATCH, TASKS, task_config, write_data
from tests.tiny import VOCAB, char_tokenizer, save_tiny_base, tiny_model
from workers.devices import DEVICE_CHOICES, Placement, resolve_device
from workers.formats import load_prefix

HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (torch.cuda.is_available() is false)")
WORKER = Path(__file__).with_name("gpu_worker.py")
STEPS = 6


# --------------------------------------------------------------------------------------------------
# Device choices (CPU)


def test_resolve_device_choices():
    assert DEVICE_CHOICES == ("auto", "cpu", "cuda")
    assert resolve_device("cpu") == resolve_device(" CPU ") == torch.device("cpu")
    expected = torch.device("cuda", 0) if HAS_CUDA else torch.device("cpu")
    assert resolve_device("auto") == resolve_device(None) == expected


@pytest.mark.parametrize("name", ["tpu", "gpu", "cuda0", "cuda:x", "cuda:-1"])
def test_resolve_device_rejects_unknown_names(name):
    if HAS_CUDA and name in ("cuda:x", "cuda:-1"):
        match = "accepted: auto, cpu, cuda, cuda:N" if name == "cuda:x" else "index must be >= 0"
    elif name.startswith("cuda:"):
        match = "no CUDA device"
    else:
        match = "accepted: auto, cpu, cuda, cuda:N"
    with pytest.raises(ValueError, match=match) as error:
        resolve_device(name)
    assert repr(name) in str(error.value)


@pytest.mark.skipif(HAS_CUDA, reason="checks the error of a machine without CUDA")
def test_cuda_without_a_gpu_names_what_is_accepted():
    for name in ("cuda", "cuda:0"):
        with pytest.raises(ValueError, match=r"no CUDA device visible; accepted here: auto, cpu") as error:
            resolve_device(name)
        assert repr(name) in str(error.value)
    with pytest.raises(ValueError, match="no CUDA device"):
        Placement.detect(cpus=2, device="cuda")


def test_placement_on_the_cpu():
    place = Placement.detect(cpus=3, device="cpu")
    assert (place.device, place.threads, place.backend) == (torch.device("cpu"), 3, "gloo")
    assert Placement.detect(cpus=0.5, device="cpu").threads == 1  # a fraction of a CPU still runs a thread
    assert Placement.detect(None, device="cpu").threads is None  # torch's own choice
    # a GPU rank: NCCL for device tensors, gloo for CPU ones, and no thread count
    assert Placement(torch.device("cuda", 0)).backend == "cpu:gloo,cuda:nccl"


# --------------------------------------------------------------------------------------------------
# One-rank groups in subprocesses, against a plain CPU trainer


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    work = tmp_path_factory.mktemp("gpu")
    save_tiny_base(work / "tiny-llama")
    write_data(work)
    return work


def group_run(work: Path, run: str, *, device: str, dtype: str = "float32", stage: int = 0) -> dict:
    """Train TASKS through a one-rank group in a fresh process (gpu_worker.py); its RESULT and prefixes."""
    spec = dict(
        folder=str(work / "tiny-llama"), work=str(work), run=run, device=device, dtype=dtype, stage=stage, steps=STEPS
    )
    proc = subprocess.run([sys.executable, str(WORKER), json.dumps(spec)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    result["final"] = {t: prefix(work / run / t) for t in TASKS}
    return result


def prefix(folder: Path) -> torch.Tensor:
    return load_prefix(folder / "prefix")[1].prompt_embeddings().detach()


@pytest.fixture(scope="module")
def plain_cpu(work) -> dict:
    """TASKS trained by a plain single-process CPU MultiTaskTrainer: initial and final prefixes, losses."""
    from workers.models import BaseModelRef, load_base_model
    from workers.trainer import MultiTaskTrainer

    model, tok = load_base_model(BaseModelRef(kind="path", location=str(work / "tiny-llama")))
    trainer = MultiTaskTrainer(model, tok, micro_batch_size=MICRO_BATCH)
    for name in TASKS:
        trainer.add_task(task_config(work, "plain-cpu", name, STEPS))
    initial = {t: trainer.prefix_of(t).clone() for t in TASKS}
    losses = {t: [] for t in TASKS}
    while trainer.active:
        for task_id, progress in trainer.step().progress.items():
            losses[task_id].append(progress.loss)
    return {"initial": initial, "losses": losses, "final": {t: prefix(work / "plain-cpu" / t) for t in TASKS}}


@pytest.fixture(scope="module")
def cuda_fp32(work) -> dict:
    return group_run(work, "cuda-fp32", device="cuda")


def max_diff(a: dict, b: dict) -> float:
    return max((a[t] - b[t]).abs().max().item() for t in TASKS)


def assert_losses_close(got: dict, expected: dict, rel: float) -> None:
    for t in TASKS:
        assert len(got[t]) == len(expected[t]) == STEPS
        for step, (x, y) in enumerate(zip(got[t], expected[t])):
            assert abs(x - y) <= rel * abs(y), (t, step, x, y)


def test_one_rank_cpu_group_trains_like_a_plain_trainer(work, plain_cpu):
    """The worker's path on the CPU (gloo): what the GPU tests compare, here exact up to summation order."""
    result = group_run(work, "cpu-group", device="cpu")
    assert result["backend"] == "gloo" and result["group_device"] == result["trainer_device"] == "cpu"
    assert result["param"] == {"device": "cpu", "dtype": "float32"} and not result["zero3_partitioned"]
    assert max_diff(result["final"], plain_cpu["final"]) < 1e-5
    assert_losses_close(result["losses"], plain_cpu["losses"], 1e-6)
    # training happened: every prefix moved by several learning rates
    assert min((plain_cpu["final"][t] - plain_cpu["initial"][t]).abs().max().item() for t in TASKS) > 0.05


@pytest.mark.gpu
@needs_cuda
def test_nccl_group_on_cuda_trains_like_the_cpu(cuda_fp32, plain_cpu):
    r = cuda_fp32
    assert "nccl" in r["backend"], r["backend"]
    assert r["group_device"] == r["trainer_device"] == "cuda:0"
    assert r["param"] == {"device": "cuda:0", "dtype": "float32"}
    assert all(p == {"device": "cuda:0", "dtype": "float32"} for p in r["prefixes"].values())
    assert r["shard"][0] == r["shard"][1] > 0
    assert max_diff(r["final"], plain_cpu["final"]) < 1e-4
    assert_losses_close(r["losses"], plain_cpu["losses"], 1e-5)
    assert 0 < r["peak_memory_bytes"] < 2**30  # the device's allocator, not the process's RSS


@pytest.mark.gpu
@needs_cuda
def test_bf16_base_on_cuda_trains_fp32_prefixes_close_to_fp32(work, cuda_fp32, plain_cpu):
    r = group_run(work, "cuda-bf16", device="cuda", dtype="bfloat16")
    assert r["param"] == {"device": "cuda:0", "dtype": "bfloat16"}
    assert all(p == {"device": "cuda:0", "dtype": "float32"} for p in r["prefixes"].values())
    assert_losses_close(r["losses"], cuda_fp32["losses"], 1e-2)
    for t in TASKS:
        init = plain_cpu["initial"][t]
        update_bf16, update_fp32 = r["final"][t] - init, cuda_fp32["final"][t] - init
        relative = ((update_bf16 - update_fp32).norm() / update_fp32.norm()).item()
        assert relative < 0.05, (t, relative)


@pytest.mark.gpu
@needs_cuda
def test_zero3_group_on_cuda_matches_stage_0(work, cuda_fp32):
    r = group_run(work, "cuda-zero3", device="cuda", stage=3)
    assert "nccl" in r["backend"] and r["zero3_partitioned"]
    assert r["param"]["device"] == "cuda:0"  # the rank's partition lives on its GPU
    assert r["shard"][0] == r["shard"][1] == cuda_fp32["shard"][1]  # one rank holds all of it
    assert all(p == {"device": "cuda:0", "dtype": "float32"} for p in r["prefixes"].values())
    assert max_diff(r["final"], cuda_fp32["final"]) < 1e-5
    assert_losses_close(r["losses"], cuda_fp32["losses"], 1e-6)


# --------------------------------------------------------------------------------------------------
# In this process: compiled layers and generation


@pytest.fixture
def no_tf32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def cuda_batch(prefixed, length: int):
    """tests/test_fused.py's mixed batch (two prefixes, 3 rows, one padded) on the GPU, prefixes as leaves."""
    from tests.test_fused import mixed_batch

    prefixes, rows, ids, mask, labels = mixed_batch(prefixed, length=length)
    return ([p.detach().cuda().requires_grad_() for p in prefixes], rows.cuda(), ids.cuda(), mask.cuda(), labels.cuda())


def loss_and_grads(prefixed, prefixes, rows, ids, mask, labels):
    for p in prefixes:
        p.grad = None
    out = prefixed.forward(prefixes, rows, ids, mask, labels, logits="targets")
    (out.row_loss_sums() * torch.tensor([1.0, 2.0, 0.5], device="cuda")).sum().backward()
    return out.token_loss.detach(), [p.grad.clone() for p in prefixes]


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("length", [11, 40])  # grouped matmul attention, and the fused attention kernel
def test_compiled_layers_on_cuda_give_the_eager_losses_and_gradients(length, no_tf32):
    from workers.inject import PrefixedModel

    model = tiny_model("llama", seed=3).cuda()
    eager, compiled = PrefixedModel(model), PrefixedModel(model)
    assert compiled.compile_layers() is None  # Triton and a C compiler are there
    batch = cuda_batch(eager, length)
    loss_e, grads_e = loss_and_grads(eager, *batch)
    loss_c, grads_c = loss_and_grads(compiled, *batch)
    assert loss_c.is_cuda and loss_e.abs().max() > 0
    assert relative(loss_c, loss_e) < 1e-5
    for g_c, g_e in zip(grads_c, grads_e):
        assert relative(g_c, g_e) < 1e-5
    assert (compiled.compiled.calls, compiled.compiled.eager_calls) == (len(model.model.layers) - 1, 1)


@pytest.mark.gpu
@needs_cuda
def test_trainer_with_compiled_layers_on_cuda_trains_as_eager(tmp_path, no_tf32):
    from tests.test_trainer import prefix_tensor, run
    from tests.test_trainer import task_config as trainer_task
    from workers.trainer import MultiTaskTrainer

    outcomes = {}
    for compiled in (True, False):
        trainer = MultiTaskTrainer(
            tiny_model("llama").cuda(), char_tokenizer(), micro_batch_size=5, compile_layers=compiled
        )
        assert trainer.device.type == "cuda" and trainer.compile_note is None
        for name in ("rev", "nxt"):  # rows of different lengths: the graph meets several shapes
            trainer.add_task(trainer_task(tmp_path, name, steps=4, out=tmp_path / f"c{compiled}" / name))
        results = run(trainer)
        if compiled:
            assert trainer.prefixed.compiled.calls > 0
        outcomes[compiled] = {t: prefix_tensor(r) for t, r in results.items()}
    assert set(outcomes[True]) == {"job-rev", "job-nxt"}
    for t in outcomes[True]:
        assert relative(outcomes[True][t], outcomes[False][t]) < 1e-4, t


@pytest.mark.gpu
@needs_cuda
def test_mixed_prefix_generation_on_cuda_matches_each_row_alone_on_cpu(no_tf32):
    from workers.generate import generate_texts
    from workers.inject import PrefixedModel

    cpu_model = tiny_model("llama", seed=5)
    gpu_model = copy.deepcopy(cpu_model).cuda()
    tok = char_tokenizer()
    on_gpu, on_cpu = PrefixedModel(gpu_model), PrefixedModel(cpu_model)
    width = on_cpu.shape.num_layers * 2 * on_cpu.shape.token_dim
    gen = torch.Generator().manual_seed(0)
    prefixes = [2 * torch.randn(p, width, generator=gen) for p in (3, 5, 8)]  # on the CPU, as downloaded
    prompts = ["rev abc=", "dbl 12=", "next xyz:", "rev abc="]
    owners = [0, 1, 2, 2]
    # 10 greedy tokens per row, each one a character the tokenizer decodes (no eos, pad or unused ids), so
    # the texts carry every generated token
    options = dict(max_new_tokens=10, min_new_tokens=10, suppress_tokens=[0, 2, 3, *range(len(tok), VOCAB)])
    mixed = generate_texts(on_gpu, tok, prefixes, owners, prompts, **options)
    alone = [generate_texts(on_cpu, tok, [prefixes[o]], [0], [p], **options)[0] for p, o in zip(prompts, owners)]
    bare = generate_texts(on_cpu, tok, None, None, prompts[:1], **options)[0]
    assert [len(text) for text in alone] == [10] * 4, alone
    assert mixed == alone
    assert alone[0] != alone[3] and bare not in (alone[0], alone[3])  # the prefixes steer the output
