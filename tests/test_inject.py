"""Prefix injection on tiny models of every supported architecture: PEFT parity, mixed-prefix batches,
gradient checkpointing, reduced-precision bases, generation."""

import copy
import warnings

import peft
import pytest
import torch

from tests.tiny import ALL, CAUSAL, SEQ2SEQ, VOCAB, peft_reference, tiny_model
from workers.inject import PrefixedModel
from workers.prefix import PrefixEncoder, PrefixTuningConfig, configure_for_model


def make_encoder(base, p, proj=False, seed=0):
    torch.manual_seed(seed)
    cfg = configure_for_model(
        PrefixTuningConfig(num_virtual_tokens=p, prefix_projection=proj, encoder_hidden_size=16), base.config
    )
    return PrefixEncoder(cfg)


def example_batch(model_type, lengths, seed=0):
    """Right-padded inputs of the given lengths, labels on the second half of each row."""
    g = torch.Generator().manual_seed(seed)
    t = max(lengths)
    ids = torch.zeros((len(lengths), t), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(3, VOCAB, (n,), generator=g)
        mask[i, :n] = 1
    if model_type in SEQ2SEQ:
        labels = torch.randint(3, VOCAB, (len(lengths), 6), generator=g)
        labels[0, 4:] = -100  # a shorter decoder target
    else:
        labels = ids.masked_fill(mask == 0, -100)
        labels[:, :2] = -100
    return ids, mask, labels


def task_mean(out, rows, j):
    sel = rows == j
    return out.token_loss[sel].sum() / out.target_mask[sel].sum()


@peft_reference
@pytest.mark.parametrize("model_type", ALL)
@pytest.mark.parametrize("proj", [False, True])
def test_parity_with_peft(model_type, proj):
    base = tiny_model(model_type)
    enc = make_encoder(base, 5, proj)
    ids, mask, labels = example_batch(model_type, [7, 7])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = PrefixedModel(copy.deepcopy(base)).forward(
            [enc.prompt_embeddings()], torch.zeros(2, dtype=torch.long), ids, mask, labels
        )
    assert not [w for w in caught if "past_key_values" in str(w.message)]  # prefixd passes `cache=`
    (ours.token_loss.sum() / ours.target_mask.sum()).backward()

    pconf = peft.PrefixTuningConfig(
        task_type="SEQ_2_SEQ_LM" if model_type in SEQ2SEQ else "CAUSAL_LM",
        num_virtual_tokens=5,
        prefix_projection=proj,
        encoder_hidden_size=16,
    )
    ref = peft.get_peft_model(copy.deepcopy(base), pconf)
    ref.prompt_encoder["default"].load_state_dict(enc.state_dict())
    out = ref(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    assert (ours.logits - out.logits).abs().max() < 1e-5
    for name, param in ref.prompt_encoder["default"].named_parameters():
        assert (dict(enc.named_parameters())[name].grad - param.grad).abs().max() < 1e-5, name


@pytest.mark.parametrize("model_type", ALL)
def test_mixed_batch_equals_rows_alone(model_type):
    """Three prefixes of lengths 5, 10, 20; rows of different input lengths; every row's logits and every
    prefix's gradient equal those of the rows run alone."""
    base = tiny_model(model_type)
    pm = PrefixedModel(base)
    encoders = [make_encoder(base, p, proj=(p == 10), seed=p) for p in (5, 10, 20)]
    rows = torch.tensor([0, 1, 2, 1, 0, 2])
    ids, mask, labels = example_batch(model_type, [9, 4, 7, 11, 6, 3])
    out = pm.forward([e.prompt_embeddings() for e in encoders], rows, ids, mask, labels)
    sum(task_mean(out, rows, j) for j in range(3)).backward()
    mixed_grads = [[p.grad.clone() for p in e.parameters()] for e in encoders]
    for e in encoders:
        e.zero_grad()

    for j, enc in enumerate(encoders):
        sel = (rows == j).nonzero().squeeze(1)
        alone = pm.forward(
            [enc.prompt_embeddings()], torch.zeros(len(sel), dtype=torch.long), ids[sel], mask[sel], labels[sel]
        )
        task_mean(alone, torch.zeros(len(sel), dtype=torch.long), 0).backward()
        for g_mixed, p in zip(mixed_grads[j], enc.parameters()):
            assert (g_mixed - p.grad).abs().max() < 1e-5
        for k, i in enumerate(sel.tolist()):
            # Compare the positions that are real in this row (decoder rows are all real for seq2seq).
            n = out.logits.shape[1] if model_type in SEQ2SEQ else int(mask[i].sum())
            single = pm.forward(
                [enc.prompt_embeddings()],
                torch.zeros(1, dtype=torch.long),
                ids[i : i + 1, : int(mask[i].sum())],
                mask[i : i + 1, : int(mask[i].sum())],
                labels[i : i + 1, : int(mask[i].sum())] if model_type in CAUSAL else labels[i : i + 1],
            )
            assert (out.logits[i, :n] - single.logits[0, :n]).abs().max() < 1e-5, (model_type, i)
            assert (out.logits[i, :n] - alone.logits[k, :n]).abs().max() < 1e-5


@pytest.mark.parametrize("model_type", ALL)
def test_logits_at_targets_only_same_losses_and_gradients(model_type):
    """logits="targets" runs the LM head at target positions only: the same token losses and prefix
    gradients as the full logits, and the logits it returns are the full ones at those positions."""
    base = tiny_model(model_type)
    pm = PrefixedModel(base)
    encoders = [make_encoder(base, p, proj=(p == 10), seed=p) for p in (5, 10)]
    rows = torch.tensor([0, 1, 1, 0])
    ids, mask, labels = example_batch(model_type, [9, 4, 7, 6])
    results = {}
    for mode in ("all", "targets"):
        for e in encoders:
            e.zero_grad()
        out = pm.forward([e.prompt_embeddings() for e in encoders], rows, ids, mask, labels, logits=mode)
        sum(task_mean(out, rows, j) for j in range(2)).backward()
        results[mode] = out, [p.grad.clone() for e in encoders for p in e.parameters()]
    (full, g_full), (kept, g_kept) = results["all"], results["targets"]
    assert torch.equal(full.target_mask, kept.target_mask)
    assert (full.token_loss - kept.token_loss).abs().max() < 1e-6
    for a, b in zip(g_full, g_kept):
        assert (a - b).abs().max() < 1e-6
    if model_type in CAUSAL:
        assert kept.logits.shape == (int(kept.target_mask.sum()), full.logits.shape[-1])
        assert (kept.logits - full.logits[kept.target_mask]).abs().max() < 1e-5
    else:  # decoder positions are the targets: all of them are computed either way
        assert kept.logits.shape == full.logits.shape
    with pytest.raises(ValueError, match="logits='some'; accepted: 'all', 'targets'"):
        pm.forward([encoders[0].prompt_embeddings()], rows[:1], ids[:1], mask[:1], labels[:1], logits="some")


@pytest.mark.parametrize("model_type", ALL)
def test_gradient_checkpointing_same_gradients(model_type):
    base = tiny_model(model_type)
    encoders = [make_encoder(base, p, seed=p) for p in (5, 10)]
    rows = torch.tensor([0, 1, 1, 0])
    ids, mask, labels = example_batch(model_type, [8, 5, 8, 6])

    def grads(checkpointing):
        pm = PrefixedModel(copy.deepcopy(base))
        pm.model.train()
        if checkpointing:
            pm.enable_checkpointing()
        for e in encoders:
            e.zero_grad()
        out = pm.forward([e.prompt_embeddings() for e in encoders], rows, ids, mask, labels)
        loss = sum(task_mean(out, rows, j) for j in range(2))
        loss.backward()
        return loss.detach(), [p.grad.clone() for e in encoders for p in e.parameters()]

    loss_plain, g_plain = grads(False)
    loss_ckpt, g_ckpt = grads(True)
    assert torch.equal(loss_plain, loss_ckpt)
    for a, b in zip(g_plain, g_ckpt):
        assert (a - b).abs().max() < 1e-6


@pytest.mark.parametrize("model_type", ["llama", "t5"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_base_fp32_prefix(model_type, dtype):
    base = tiny_model(model_type, dtype=dtype)
    pm = PrefixedModel(base)
    enc = make_encoder(base, 6)
    assert enc.embedding.weight.dtype == torch.float32
    ids, mask, labels = example_batch(model_type, [6, 4])
    out = pm.forward([enc.prompt_embeddings()], torch.zeros(2, dtype=torch.long), ids, mask, labels)
    (out.token_loss.sum() / out.target_mask.sum()).backward()
    assert out.logits.dtype == dtype
    assert enc.embedding.weight.grad.dtype == torch.float32
    assert torch.isfinite(enc.embedding.weight.grad).all() and enc.embedding.weight.grad.abs().sum() > 0


def left_padded(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = max(lengths)
    ids = torch.zeros((len(lengths), t), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, t - n :] = torch.randint(3, VOCAB, (n,), generator=g)
        mask[i, t - n :] = 1
    return ids, mask


def seq2seq_inputs(lengths, seed=0):
    ids, mask = left_padded(lengths, seed)
    return ids.flip(1), mask.flip(1)  # encoders take right padding


@pytest.mark.parametrize("model_type", ALL)
@pytest.mark.parametrize("mode", ["greedy", "beam", "sample"])
def test_generate_mixed_prefixes_equals_alone(model_type, mode):
    base = tiny_model(model_type)
    pm = PrefixedModel(base)
    encoders = [make_encoder(base, p, seed=p) for p in (5, 10, 20)]
    prefixes = [e.prompt_embeddings().detach() * 8 for e in encoders]  # scaled so prefixes matter
    rows = torch.tensor([2, 0, 1])
    ids, mask = (seq2seq_inputs if model_type in SEQ2SEQ else left_padded)([5, 8, 3])
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, pad_token_id=0, eos_token_id=None)
    if mode == "beam":
        kwargs.update(num_beams=3, do_sample=False)
    elif mode == "sample":
        kwargs.update(do_sample=True, top_k=5)
    else:
        kwargs.update(do_sample=False)
    torch.manual_seed(0)
    mixed = pm.generate(prefixes, rows, ids, mask, **kwargs)
    bare = pm.generate(None, None, ids, mask, **kwargs)
    for i in range(3):
        n = int(mask[i].sum())
        row_ids, row_mask = (
            (ids[i : i + 1, :n], mask[i : i + 1, :n])
            if model_type in SEQ2SEQ
            else (ids[i : i + 1, -n:], mask[i : i + 1, -n:])
        )
        if mode == "sample":
            continue  # random streams differ with batch composition; checked for shape and prefix effect below
        alone = pm.generate([prefixes[rows[i]]], torch.zeros(1, dtype=torch.long), row_ids, row_mask, **kwargs)
        assert torch.equal(mixed[i], alone[0]), (model_type, mode, i)
    assert mixed.shape == bare.shape
    assert not torch.equal(mixed, bare)


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "t5"])
def test_greedy_generate_equals_stepwise_decode(model_type):
    """generate() with a prefix equals a hand-written greedy loop over full forwards with that prefix."""
    base = tiny_model(model_type)
    pm = PrefixedModel(base)
    prefix = make_encoder(base, 7, seed=3).prompt_embeddings().detach() * 8
    ids, mask = (seq2seq_inputs if model_type in SEQ2SEQ else left_padded)([6])
    got = pm.generate(
        [prefix],
        torch.zeros(1, dtype=torch.long),
        ids,
        mask,
        max_new_tokens=5,
        min_new_tokens=5,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
    )
    rows = torch.zeros(1, dtype=torch.long)
    tokens = []
    with torch.no_grad():
        for _ in range(5):
            if model_type in SEQ2SEQ:
                start = base.config.decoder_start_token_id
                dec = torch.tensor([[start] + tokens])
                labels = torch.cat([dec[:, 1:], torch.tensor([[0]])], dim=1)  # decoder input = shift(labels)
                out = pm.forward([prefix], rows, ids, mask, labels)
            else:
                seq = torch.cat([ids, torch.tensor([tokens], dtype=torch.long)], dim=1)
                out = pm.forward([prefix], rows, seq, torch.ones_like(seq))
            tokens.append(int(out.logits[0, -1].argmax()))
    decoded = got[0, 1:].tolist() if model_type in SEQ2SEQ else got[0].tolist()
    assert decoded == tokens
