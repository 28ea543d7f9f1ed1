"""Prefixes on disk: PEFT adapter folders (both ways) and prefixd's own resumable files. Never pickle.

PEFT adapter folder (what `peft.PeftModel.from_pretrained` loads):
    adapter_config.json          PrefixTuningConfig fields, inference_mode true
    adapter_model.safetensors    one tensor `prompt_embeddings` [P, num_layers*2*token_dim]: the encoder's
                                 output; a projection MLP is not kept (PEFT's format)

prefixd prefix folder (keeps the whole encoder, projection included, so training can resume):
    prefix_config.json           PrefixTuningConfig fields
    prefix_encoder.safetensors   the encoder's state dict (PEFT's keys)

Any other state (optimizer, scheduler, RNG, data position) is saved with `save_tree`: tensors into
`<name>.safetensors`, everything else into `<name>.json` with references to the tensors.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from workers.prefix import PrefixConfigError, PrefixEncoder, PrefixTuningConfig

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX_CONFIG = "prefix_config.json"
PREFIX_WEIGHTS = "prefix_encoder.safetensors"
_PICKLE_NAMES = ("adapter_model.bin", "pytorch_model.bin", "prefix_encoder.bin", "prefix_encoder.pt")
_CONFIG_FIELDS = {f.name for f in dataclasses.fields(PrefixTuningConfig)}


class PrefixFormatError(ValueError):
    """A prefix folder or file that cannot be loaded; names the file and what is wrong."""


# --------------------------------------------------------------------------------------------------
# safetensors with a clear refusal of anything else


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file; a pickle (or torch.save zip) in its place is refused, not unpickled."""
    path = Path(path)
    if not path.is_file():
        raise PrefixFormatError(f"{path}: no such file")
    with open(path, "rb") as f:
        head = f.read(9)  # safetensors: u64 header length, then the JSON header's "{"
    if head[8:9] != b"{" and (head[:1] == b"\x80" or head[:2] == b"PK"):
        raise PrefixFormatError(
            f"{path}: this is a pickle / torch.save file; only safetensors is accepted (pickles can run code)"
        )
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise PrefixFormatError(f"{path}: not a valid safetensors file ({e})") from None


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise PrefixFormatError(f"{path}: no such file")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PrefixFormatError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise PrefixFormatError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def _config_from_json(data: dict, source: Path) -> PrefixTuningConfig:
    if data.get("peft_type") != "PREFIX_TUNING":
        raise PrefixFormatError(f"{source}: peft_type is {data.get('peft_type')!r}; only 'PREFIX_TUNING' is accepted")
    try:
        return PrefixTuningConfig(**{k: v for k, v in data.items() if k in _CONFIG_FIELDS})
    except (PrefixConfigError, TypeError) as e:
        raise PrefixFormatError(f"{source}: {e}") from None


def _check_fits_model(config: PrefixTuningConfig, model_config: Any, source: Path) -> None:
    if model_config is None:
        return
    from workers.prefix import configure_for_model

    try:
        configure_for_model(dataclasses.replace(config, base_model_name_or_path=None), model_config)
    except (PrefixConfigError, ValueError) as e:
        raise PrefixFormatError(f"{source}: does not fit the base model: {e}") from None


# --------------------------------------------------------------------------------------------------
# PEFT adapter folders


def save_peft_adapter(folder: str | Path, encoder: PrefixEncoder, config: PrefixTuningConfig) -> Path:
    """Write `encoder` as a PEFT adapter folder; returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    payload = config.to_dict() | {"inference_mode": True, "peft_version": _peft_version()}
    with torch.no_grad():
        embeddings = encoder.prompt_embeddings().detach().float().cpu().contiguous()
    save_file({"prompt_embeddings": embeddings}, folder / ADAPTER_WEIGHTS)
    (folder / ADAPTER_CONFIG).write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return folder


def load_peft_adapter(folder: str | Path, model_config: Any = None) -> tuple[PrefixTuningConfig, PrefixEncoder]:
    """Read a PEFT prefix-tuning adapter folder into an inference-mode encoder.

    Checks the tensor's shape against the config and, when `model_config` is given, the config
    against the model. Returns (config, encoder) with encoder.prompt_embeddings() equal to the file's.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise PrefixFormatError(f"{folder}: no such adapter folder")
    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file() and any((folder / n).is_file() for n in _PICKLE_NAMES):
        raise PrefixFormatError(f"{folder}: holds pickle weights only; only {ADAPTER_WEIGHTS} is accepted")
    config = _config_from_json(_read_json(folder / ADAPTER_CONFIG), folder / ADAPTER_CONFIG)
    tensors = read_safetensors(weights)
    if "prompt_embeddings" not in tensors:
        raise PrefixFormatError(f"{weights}: no tensor 'prompt_embeddings' (found: {', '.join(tensors) or 'none'})")
    emb = tensors["prompt_embeddings"]
    for name in ("num_virtual_tokens", "num_layers", "token_dim"):
        if getattr(config, name) is None:
            raise PrefixFormatError(f"{folder / ADAPTER_CONFIG}: {name} is missing")
    expected = (config.num_virtual_tokens, config.num_layers * 2 * config.token_dim)
    if tuple(emb.shape) != expected:
        raise PrefixFormatError(
            f"{weights}: prompt_embeddings has shape {tuple(emb.shape)}; the config says "
            f"[num_virtual_tokens, num_layers*2*token_dim] = {list(expected)}"
        )
    _check_fits_model(config, model_config, folder / ADAPTER_CONFIG)
    config = dataclasses.replace(config, inference_mode=True)
    encoder = PrefixEncoder(config)
    with torch.no_grad():
        encoder.embedding.weight.copy_(emb.float())
    return config, encoder


def _peft_version() -> str:
    try:
        from importlib.metadata import version

        return version("peft")
    except Exception:
        return "0.21.2"  # the format version prefixd writes; peft need not be installed


# --------------------------------------------------------------------------------------------------
# prefixd's own prefix folders (trainable: projection MLP kept)


def save_prefix(folder: str | Path, encoder: PrefixEncoder, config: PrefixTuningConfig) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
    save_file(state, folder / PREFIX_WEIGHTS)
    (folder / PREFIX_CONFIG).write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return folder


def load_prefix(folder: str | Path, model_config: Any = None) -> tuple[PrefixTuningConfig, PrefixEncoder]:
    """Load a prefixd prefix folder into a trainable encoder (projection included)."""
    folder = Path(folder)
    config = _config_from_json(_read_json(folder / PREFIX_CONFIG), folder / PREFIX_CONFIG)
    _check_fits_model(config, model_config, folder / PREFIX_CONFIG)
    encoder = PrefixEncoder(config)
    state = read_safetensors(folder / PREFIX_WEIGHTS)
    expected = {k: tuple(v.shape) for k, v in encoder.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if expected != got:
        raise PrefixFormatError(f"{folder / PREFIX_WEIGHTS}: tensors {got} do not match the config's {expected}")
    encoder.load_state_dict(state)
    return config, encoder


# --------------------------------------------------------------------------------------------------
# Arbitrary nested state (optimizer, scheduler, RNG, data position) as safetensors + JSON


def save_tree(stem: str | Path, tree: Any) -> None:
    """Save nested dicts/lists of tensors and JSON scalars as `<stem>.safetensors` + `<stem>.json`."""
    stem = Path(stem)
    tensors: dict[str, torch.Tensor] = {}

    def encode(node: Any) -> Any:
        if isinstance(node, torch.Tensor):
            key = f"t{len(tensors)}"
            tensors[key] = node.detach().cpu().contiguous()
            return {"__tensor__": key}
        if isinstance(node, dict):
            return {"__dict__": [[encode(k), encode(v)] for k, v in node.items()]}
        if isinstance(node, (list, tuple)):
            return {"__list__": [encode(v) for v in node], "tuple": isinstance(node, tuple)}
        if node is None or isinstance(node, (bool, int, float, str)):
            return node
        raise TypeError(f"cannot save a {type(node).__name__} in a state tree")

    skeleton = encode(tree)
    stem.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, f"{stem}.safetensors")
    Path(f"{stem}.json").write_text(json.dumps(skeleton), encoding="utf-8")


def load_tree(stem: str | Path) -> Any:
    stem = Path(stem)
    tensors = read_safetensors(Path(f"{stem}.safetensors"))
    skeleton = json.loads(Path(f"{stem}.json").read_text(encoding="utf-8"))

    def decode(node: Any) -> Any:
        if isinstance(node, dict):
            if "__tensor__" in node:
                return tensors[node["__tensor__"]]
            if "__dict__" in node:
                return {decode(k): decode(v) for k, v in node["__dict__"]}
            if "__list__" in node:
                items = [decode(v) for v in node["__list__"]]
                return tuple(items) if node.get("tuple") else items
        return node

    return decode(skeleton)
