"""Prefixes on disk: PEFT adapter round trips both ways, prefixd's own folders, and refusals."""

import copy
import json
import pickle

import peft
import pytest
import torch
from safetensors.torch import save_file

from tests.tiny import SEQ2SEQ, peft_reference, tiny_config, tiny_model
from workers.formats import (
    PrefixFormatError,
    load_peft_adapter,
    load_prefix,
    load_tree,
    save_peft_adapter,
    save_prefix,
    save_tree,
)
from workers.inject import PrefixedModel
from workers.prefix import PrefixEncoder, PrefixTuningConfig, configure_for_model


def trained_like_encoder(base, proj, p=6):
    torch.manual_seed(4)
    cfg = configure_for_model(
        PrefixTuningConfig(num_virtual_tokens=p, prefix_projection=proj, encoder_hidden_size=24), base.config
    )
    return cfg, PrefixEncoder(cfg)


def inputs(model_type):
    torch.manual_seed(5)
    ids = torch.randint(3, 96, (2, 9))
    labels = torch.randint(3, 96, (2, 5)) if model_type in SEQ2SEQ else None
    return ids, torch.ones_like(ids), labels


@peft_reference
@pytest.mark.parametrize("model_type", ["gpt2", "llama", "t5"])
@pytest.mark.parametrize("proj", [False, True])
def test_ours_to_peft_folder_to_peftmodel(tmp_path, model_type, proj):
    base = tiny_model(model_type)
    cfg, enc = trained_like_encoder(base, proj)
    save_peft_adapter(tmp_path / "adapter", enc, cfg)
    ids, mask, labels = inputs(model_type)
    ours = PrefixedModel(copy.deepcopy(base)).forward(
        [enc.prompt_embeddings()], torch.zeros(2, dtype=torch.long), ids, mask, labels
    )
    ref = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter")
    kwargs = {"labels": labels} if labels is not None else {}
    out = ref(input_ids=ids, attention_mask=mask, **kwargs)
    assert (ours.logits - out.logits).abs().max() < 1e-6  # two code paths: equal up to summation order


@peft_reference
@pytest.mark.parametrize("model_type", ["gpt2", "llama", "bart"])
def test_peft_saved_to_ours(tmp_path, model_type):
    base = tiny_model(model_type)
    torch.manual_seed(6)
    task = "SEQ_2_SEQ_LM" if model_type in SEQ2SEQ else "CAUSAL_LM"
    ref = peft.get_peft_model(
        copy.deepcopy(base), peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=7, prefix_projection=True)
    )
    ref.save_pretrained(tmp_path / "peft")
    ref.eval()
    cfg, enc = load_peft_adapter(tmp_path / "peft", base.config)
    assert cfg.num_virtual_tokens == 7 and cfg.inference_mode
    ids, mask, labels = inputs(model_type)
    kwargs = {"labels": labels} if labels is not None else {}
    expected = ref(input_ids=ids, attention_mask=mask, **kwargs).logits
    ours = PrefixedModel(copy.deepcopy(base)).forward(
        [enc.prompt_embeddings()], torch.zeros(2, dtype=torch.long), ids, mask, labels
    )
    assert (ours.logits - expected).abs().max() < 1e-6


def test_own_prefix_folder_keeps_projection(tmp_path):
    base = tiny_model("llama")
    cfg, enc = trained_like_encoder(base, proj=True)
    save_prefix(tmp_path / "p", enc, cfg)
    cfg2, enc2 = load_prefix(tmp_path / "p", base.config)
    assert cfg2 == cfg and hasattr(enc2, "transform")
    for (k, a), (_, b) in zip(enc.state_dict().items(), enc2.state_dict().items()):
        assert torch.equal(a, b), k
    assert all(p.requires_grad for p in enc2.parameters())


def test_state_tree_round_trip(tmp_path):
    opt_state = {
        "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(4, 5)}},
        "param_groups": [{"lr": 0.1, "betas": (0.9, 0.999), "params": [0], "foreach": None}],
    }
    tree = {"optimizer": opt_state, "rng": torch.get_rng_state(), "position": [2, 17], "name": "x"}
    save_tree(tmp_path / "state", tree)
    back = load_tree(tmp_path / "state")
    assert back["position"] == [2, 17] and back["name"] == "x"
    assert torch.equal(back["rng"], tree["rng"])
    assert back["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)
    assert torch.equal(back["optimizer"]["state"][0]["exp_avg"], opt_state["state"][0]["exp_avg"])


# ---------------------------------------------------------------- bad input


def test_wrong_tensor_shape_is_refused(tmp_path):
    base = tiny_model("llama")
    cfg, enc = trained_like_encoder(base, proj=False)
    save_peft_adapter(tmp_path / "a", enc, cfg)
    save_file({"prompt_embeddings": torch.zeros(6, 10)}, tmp_path / "a" / "adapter_model.safetensors")
    with pytest.raises(PrefixFormatError, match=r"prompt_embeddings has shape \(6, 10\).*\[6, 64\]"):
        load_peft_adapter(tmp_path / "a")


def test_config_not_matching_model_is_refused(tmp_path):
    base = tiny_model("llama")
    cfg, enc = trained_like_encoder(base, proj=False)
    save_peft_adapter(tmp_path / "a", enc, cfg)
    other = tiny_config("gpt2")  # 2 layers but token_dim 32 and 4 heads
    with pytest.raises(PrefixFormatError, match="token_dim: 16 does not match the model"):
        load_peft_adapter(tmp_path / "a", other)


def test_pickle_is_refused(tmp_path):
    base = tiny_model("gpt2")
    cfg, enc = trained_like_encoder(base, proj=False)
    save_peft_adapter(tmp_path / "a", enc, cfg)
    (tmp_path / "a" / "adapter_model.safetensors").write_bytes(pickle.dumps({"prompt_embeddings": [1, 2]}))
    with pytest.raises(PrefixFormatError, match="pickle"):
        load_peft_adapter(tmp_path / "a")
    (tmp_path / "a" / "adapter_model.safetensors").unlink()
    torch.save({"prompt_embeddings": torch.zeros(2)}, tmp_path / "a" / "adapter_model.bin")
    with pytest.raises(PrefixFormatError, match="pickle weights only"):
        load_peft_adapter(tmp_path / "a")


def test_other_peft_type_is_refused(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    save_file({"x": torch.zeros(1)}, tmp_path / "a" / "adapter_model.safetensors")
    with pytest.raises(PrefixFormatError, match="peft_type is 'LORA'; only 'PREFIX_TUNING'"):
        load_peft_adapter(tmp_path / "a")
