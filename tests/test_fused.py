"""Compiled decoder layers (workers/fused.py): the same losses, gradients and training as the eager path."""

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from tests.test_trainer import TASKS, prefix_tensor, run, task_config
from tests.tiny import char_tokenizer, tiny_config, tiny_model
from workers import fused
from workers.inject import PrefixedModel
from workers.trainer import MultiTaskTrainer

FUSABLE = ("llama", "mistral", "qwen2")


def mixed_batch(prefixed: PrefixedModel, seed: int = 0, length: int = 11):
    """Two prefixes of different lengths over three right-padded rows, labels on the second half."""
    gen = torch.Generator().manual_seed(seed)
    width = prefixed.shape.num_layers * 2 * prefixed.shape.token_dim
    prefixes = [
        torch.randn(3, width, generator=gen).requires_grad_(),
        torch.randn(6, width, generator=gen).requires_grad_(),
    ]
    ids = torch.randint(4, 90, (3, length), generator=gen)
    mask = torch.ones(3, length, dtype=torch.long)
    mask[1, length * 2 // 3 :] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, : length // 2] = -100
    return prefixes, torch.tensor([0, 1, 0]), ids, mask, labels


def loss_and_grads(prefixed: PrefixedModel, prefixes, rows, ids, mask, labels):
    for p in prefixes:
        p.grad = None
    out = prefixed.forward(prefixes, rows, ids, mask, labels, logits="targets")
    (out.row_loss_sums() * torch.tensor([1.0, 2.0, 0.5])).sum().backward()
    return out.token_loss.detach(), [p.grad.clone() for p in prefixes]


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize(
    "model_type, attention, length",
    [(m, "sdpa", 11) for m in FUSABLE] + [("llama", "eager", 11), ("llama", "sdpa", 40)],
)
def test_compiled_layers_give_the_eager_losses_and_gradients(model_type, attention, length):
    """sdpa models hand the layers a boolean mask, eager-attention models an additive float one; 40-token
    rows take the fused attention kernel instead of the grouped matmuls (see test_attention_forms)."""
    model = tiny_model(model_type, seed=3)
    model.set_attn_implementation(attention)
    assert model.config._attn_implementation == attention
    eager, compiled = PrefixedModel(model), PrefixedModel(model)
    assert compiled.compile_layers() is None
    batch = mixed_batch(eager, length=length)
    loss_e, grads_e = loss_and_grads(eager, *batch)
    loss_c, grads_c = loss_and_grads(compiled, *batch)
    assert relative(loss_c, loss_e) < 1e-5
    for g_c, g_e in zip(grads_c, grads_e):
        assert relative(g_c, g_e) < 1e-5
    layers = model.model.layers
    # it really ran compiled: every layer but the first, whose input needs no gradient
    assert (compiled.compiled.calls, compiled.compiled.eager_calls) == (len(layers) - 1, 1)
    assert all("forward" not in layer.__dict__ for layer in layers)  # and gave the layers back


@pytest.mark.parametrize("t, s, grouped", [(11, 17, True), (40, 46, False)])
def test_attention_forms(t, s, grouped):
    """Both forms of `_attention` equal the fused kernel over repeated keys/values, for boolean and additive
    masks; which one runs follows the memory rule (head_dim 8: T * S <= 8 * (2S + T))."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, t, 8, generator=gen)
    k, v = torch.randn(2, 2, s, 8, generator=gen), torch.randn(2, 2, s, 8, generator=gen)
    keep = torch.ones(2, 1, t, s, dtype=torch.bool).tril(diagonal=s - t)
    keep[1, :, :, :3] = False  # a prefix slot row 1 does not have
    assert (t * s <= 8 * (2 * s + t)) is grouped
    additive = fused.additive_mask(keep, torch.float32)
    assert additive.dtype == torch.float32 and fused.additive_mask(additive, torch.float32) is additive
    assert torch.equal(additive == 0, keep) and (additive[~keep] == torch.finfo(torch.float32).min).all()
    for mask in (keep, additive):
        expected = F.scaled_dot_product_attention(
            q, fused._repeat_kv(k, 2), fused._repeat_kv(v, 2), attn_mask=mask, scale=0.3
        )
        assert torch.allclose(fused._attention(q, k, v, mask, 0.3), expected, atol=1e-6)
        assert torch.allclose(fused._grouped_attention(q, k, v, mask, 0.3), expected, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_written_out_cross_entropy_gives_the_losses_and_gradients_of_f_cross_entropy(dtype):
    gen = torch.Generator().manual_seed(1)
    logits = (torch.randn(7, 50, generator=gen) * 4).to(dtype)
    targets = torch.randint(0, 50, (7,), generator=gen)
    targets[3] = targets[4]  # two rows, one target id
    weights = torch.rand(7, generator=gen)
    results = []
    for loss_fn in (
        fused.token_cross_entropy,
        fused.fused_token_cross_entropy,
        torch.compile(fused.fused_token_cross_entropy),
    ):
        x = logits.clone().requires_grad_()
        loss = loss_fn(x, targets)
        (loss * weights).sum().backward()
        assert loss.dtype == torch.float32 and x.grad.dtype == dtype
        results.append((loss.detach(), x.grad.float()))
    (loss_ref, grad_ref), *others = results
    for loss, grad in others:
        assert torch.allclose(loss, loss_ref, rtol=1e-6, atol=1e-6)
        assert torch.allclose(grad, grad_ref, atol=1e-6 if dtype == torch.float32 else 1e-2)


def test_the_boolean_mask_is_made_additive_once_per_forward(monkeypatch):
    """Every layer gets the model's one mask object: it is converted for the first compiled layer, reused by
    the others, and let go when the forward ends."""
    config = tiny_config("llama")
    config.num_hidden_layers = 3  # two compiled layers
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    prefixed = PrefixedModel(model)
    prefixed.compile_layers()
    converted = []
    real = fused.additive_mask
    monkeypatch.setattr(fused, "additive_mask", lambda mask, dtype: converted.append(mask.dtype) or real(mask, dtype))
    loss_and_grads(prefixed, *mixed_batch(prefixed))
    assert converted == [torch.bool]
    assert prefixed.compiled.calls == len(model.model.layers) - 1 > 1
    assert prefixed.compiled._masks is None


def test_only_autograd_forwards_are_compiled_and_a_failing_forward_restores_the_layers():
    model = tiny_model("llama")
    prefixed = PrefixedModel(model)
    prefixed.compile_layers()
    prefixes, rows, ids, mask, labels = mixed_batch(prefixed)
    with torch.no_grad():  # evaluation: the eager layers
        prefixed.forward(prefixes, rows, ids, mask, labels)
    assert prefixed.compiled.calls == 0
    bad = ids.clone()
    bad[0, 0] = model.config.vocab_size + 5  # the embedding lookup fails inside the swapped-in block
    with pytest.raises(IndexError):
        prefixed.forward(prefixes, rows, bad, mask, labels)
    assert all("forward" not in layer.__dict__ for layer in model.model.layers)
    PrefixedModel(model).forward(prefixes, rows, ids, mask, labels)  # the model is whole


def test_unsupported_models_say_why_and_keep_the_eager_path(tmp_path, monkeypatch):
    assert "model_type 'gpt2'" in PrefixedModel(tiny_model("gpt2")).compile_layers()
    assert "encoder-decoder" in PrefixedModel(tiny_model("t5")).compile_layers()

    gelu = tiny_model("llama")
    gelu.config.hidden_act = "gelu"
    assert "hidden_act 'gelu'" in PrefixedModel(gelu).compile_layers()

    partitioned = tiny_model("llama")
    next(partitioned.parameters()).ds_id = 0  # what DeepSpeed ZeRO-3 marks its partitioned parameters with
    assert "ZeRO-3" in PrefixedModel(partitioned).compile_layers()

    monkeypatch.setenv("PATH", str(tmp_path))  # no compiler on it
    monkeypatch.delenv("CXX", raising=False)
    assert "no C++ compiler" in PrefixedModel(tiny_model("llama")).compile_layers()
    monkeypatch.undo()

    checkpointed = MultiTaskTrainer(tiny_model("llama"), char_tokenizer(), checkpointing=True, compile_layers=True)
    assert "checkpointing" in checkpointed.compile_note and checkpointed.prefixed.compiled is None
    checkpointed.add_task(task_config(tmp_path, "rev", steps=2))
    assert run(checkpointed)["job-rev"].steps == 2


def test_trainer_with_compiled_layers_trains_as_eager_and_cotenants_stay_independent(tmp_path):
    """Rows of different lengths (so the compiled graph meets several shapes), three tasks with different
    prefix lengths: jointly compiled = each alone compiled (1e-5), and = eager (float rounding)."""

    def trainer(compile_layers):
        return MultiTaskTrainer(
            tiny_model("llama"), char_tokenizer(), micro_batch_size=5, compile_layers=compile_layers
        )

    joint = trainer(True)
    assert joint.compile_note is None and joint.prefixed.compiled is not None
    for name in TASKS:
        joint.add_task(task_config(tmp_path, name, steps=8, out=tmp_path / "joint" / name))
    together = run(joint)
    assert joint.prefixed.compiled.calls == joint.prefixed.compiled.eager_calls * (len(joint.model.model.layers) - 1)
    for name in TASKS:
        outcomes = {}
        for compiled in (True, False):
            alone = trainer(compiled)
            alone.add_task(task_config(tmp_path, name, steps=8, out=tmp_path / f"alone-{compiled}" / name))
            outcomes[compiled] = prefix_tensor(run(alone)[f"job-{name}"])
        ours = prefix_tensor(together[f"job-{name}"])
        assert (ours - outcomes[True]).abs().max().item() < 1e-5, name
        assert relative(ours, outcomes[False]) < 1e-4, name
