"""Out of memory in one task's rows fails that task alone; its co-tenants train as if it had never joined.

The device running out of memory is simulated at the model: a forward hook on the base model's input
embeddings raises the error whenever a batch holds a row of the marked task (its prompts carry '|', a
character no other task's data has), as a device would for rows too large for it.
"""

import json

import pytest
import torch

from tests.test_trainer import prefix_tensor, run, task_config, trainer
from tests.tiny import tiny_task
from workers.data import DataSettings

MARK = "|"


def huge_task(tmp_path, steps):
    path = tmp_path / "huge.jsonl"
    path.write_text(
        "".join(json.dumps({"input": f"oom {MARK}{'ab' * (i % 4)}=", "target": "ba"}) + "\n" for i in range(30))
    )
    data = DataSettings(train=str(path), input_column="input", target_column="target", max_length=40)
    return tiny_task("huge", data, tmp_path / "out" / "huge", prefix_length=4, steps=steps, examples_per_step=4, seed=2)


def run_out_of_memory_on(tr, error: type[BaseException]) -> list[int]:
    """Make `tr`'s base model raise `error` for any batch that holds a marked row; returns the list of how
    many unmarked rows each refused batch held (so a test sees mixed batches were refused)."""
    mark = tr.tokenizer.convert_tokens_to_ids(MARK)
    refused = []

    def hook(module, args):
        marked = (args[0] == mark).any(dim=1)
        if marked.any():
            refused.append(int((~marked).sum()))
            raise error("simulated: tried to allocate 20.00 GiB")

    tr.model.get_input_embeddings().register_forward_pre_hook(hook)
    return refused


@pytest.mark.parametrize("error", [torch.OutOfMemoryError, MemoryError])
def test_out_of_memory_in_one_tasks_rows_fails_that_task_alone(tmp_path, error):
    steps = 4
    mixed = trainer(micro_batch_size=6)
    refused = run_out_of_memory_on(mixed, error)
    for name in ("rev", "nxt"):
        mixed.add_task(task_config(tmp_path, name, steps=steps, out=tmp_path / "mixed" / name))
    mixed.add_task(huge_task(tmp_path, steps))
    first = mixed.step()
    assert set(first.failed) == {"huge"}
    assert first.failed["huge"].startswith("out of memory on its own rows at step 1 (4 rows of up to")
    assert f"{error.__name__}: simulated: tried to allocate 20.00 GiB" in first.failed["huge"]
    assert refused[0] > 0 and refused[1:] == [0]  # a mixed micro-batch, then the task's rows alone
    assert sorted(first.progress) == ["job-nxt", "job-rev"] and mixed.active == ["job-rev", "job-nxt"]
    results = run(mixed)

    alone = trainer(micro_batch_size=6)
    for name in ("rev", "nxt"):
        alone.add_task(task_config(tmp_path, name, steps=steps, out=tmp_path / "alone" / name))
    reference = run(alone)
    for task_id in ("job-rev", "job-nxt"):
        torch.testing.assert_close(
            prefix_tensor(results[task_id]), prefix_tensor(reference[task_id]), atol=1e-5, rtol=0
        )
        assert results[task_id].metrics["eval_loss"] == pytest.approx(reference[task_id].metrics["eval_loss"], abs=1e-5)
