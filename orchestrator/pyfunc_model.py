"""One registered prefix as an MLflow pyfunc model: text in, text out.

    model = mlflow.pyfunc.load_model("models:/prefixd-capitals@champion")
    model.predict(["The capital of France is"])                        # -> ["Paris"]
    model.predict(pd.DataFrame({"prompt": [...]}), params={"max_new_tokens": 8})

What a logged version holds (its `artifacts/` folder; no base-model weights, nothing torch pickled):
    adapter/          the PEFT prefix-tuning adapter (adapter_config.json + adapter_model.safetensors)
    prefix/           prefixd's own prefix folder (the whole encoder, projection included)
    base_model.json   where the frozen base model comes from: BaseModelRef fields (kind, location,
                      revision, dtype) and the sha256 of its safetensors weights when known

`load_context` loads that base model through `workers.models.load_base_model` (a local folder must exist at
the recorded path; a built-in model needs its package; a hub model the hub) and refuses weights whose sha256
differs from the recorded one. `predict` decodes greedily through `workers.generate.generate_texts`, as
`prefixd generate` and evaluation do, so all three give the same text. The model is logged from code
(PYFUNC_ENTRY imports this class; nothing is pickled), so loading needs prefixd importable (installed,
or the repository on PYTHONPATH).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

from workers.models import BaseModelRef, ModelLoadError

ADAPTER = "adapter"
PREFIX = "prefix"
BASE_MODEL = "base_model"
BASE_MODEL_FILE = "base_model.json"
DEFAULT_MAX_NEW_TOKENS = 32
DEVICE_ENV = "PREFIXD_DEVICE"  # where a loaded model generates: auto (default: the GPU if any), cpu, cuda, cuda:N
PYFUNC_ENTRY = """\
# prefixd: the MLflow pyfunc entry point of a registered prefix (models-from-code).
from mlflow.models import set_model

from orchestrator.pyfunc_model import PrefixPyfuncModel

set_model(PrefixPyfuncModel())
"""


def describe_base(ref: BaseModelRef) -> str:
    """'kind:location@revision:dtype' (no '@revision' when there is none): the job spec's base_key."""
    revision = f"@{ref.revision}" if ref.revision else ""
    return f"{ref.kind}:{ref.location}{revision}:{ref.dtype}"


def base_model_record(ref: BaseModelRef, sha256: str | None) -> dict[str, Any]:
    """The content of base_model.json."""
    return {
        "kind": ref.kind,
        "location": ref.location,
        "revision": ref.revision,
        "dtype": ref.dtype,
        "sha256": sha256,
        "description": describe_base(ref),
    }


def read_base_model_record(path: str | Path) -> tuple[BaseModelRef, str | None]:
    """(ref, sha256 or None) from a base_model.json; ModelLoadError if it is unreadable."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        ref = BaseModelRef(
            kind=data["kind"],
            location=data["location"],
            revision=data.get("revision"),
            dtype=data.get("dtype", "float32"),
        )
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelLoadError(f"{path}: not a prefixd base-model record ({e})") from None
    return ref, data.get("sha256")


def load_recorded_base(ref: BaseModelRef, sha256: str | None):
    """(model, tokenizer) of a recorded base model, or ModelLoadError naming it: missing on this machine,
    or present with other weights than the ones the prefix was trained on."""
    from workers.models import load_base_model, resolve_folder, weights_fingerprint

    name = describe_base(ref)
    try:
        folder = resolve_folder(ref)
        if sha256 and folder is not None:
            found = weights_fingerprint(folder)
            if found != sha256:
                raise ModelLoadError(
                    f"base model {name}: the weights in {folder} have sha256 {found[:12]}..., "
                    f"not {sha256[:12]}... as recorded when the prefix was registered"
                )
        return load_base_model(ref)
    except ModelLoadError as e:
        message = str(e)
        if name not in message:
            message = f"base model {name}: {message}"
        raise ModelLoadError(f"{message} (the prefix needs this base model on this machine)") from None


def prompts_of(model_input: Any) -> list[str]:
    """Prompts from a list/tuple of strings, one string, a pandas Series, or a DataFrame with a `prompt`
    column (a one-column DataFrame is also read, as pyfunc's schema enforcement turns a list into one)."""
    if isinstance(model_input, str):
        values: list[Any] = [model_input]
    elif isinstance(model_input, pd.DataFrame):
        if "prompt" in model_input.columns:
            values = model_input["prompt"].tolist()
        elif len(model_input.columns) == 1:
            values = model_input.iloc[:, 0].tolist()
        else:
            raise ValueError(
                f"model input: a DataFrame needs a 'prompt' column; got columns {[str(c) for c in model_input.columns]}"
            )
    elif isinstance(model_input, pd.Series):
        values = model_input.tolist()
    elif isinstance(model_input, (list, tuple)):
        values = list(model_input)
    else:
        raise ValueError(
            f"model input: expected a list of strings or a DataFrame with a 'prompt' column, "
            f"got {type(model_input).__name__}"
        )
    bad = [v for v in values if not isinstance(v, str)]
    if bad:
        raise ValueError(f"model input: every prompt must be a string; got {bad[0]!r}")
    return values


def signature() -> ModelSignature:
    """Input: one string column (a list of prompts, or a DataFrame column `prompt`); output: strings;
    param max_new_tokens (default 32)."""
    return ModelSignature(
        inputs=Schema([ColSpec("string")]),
        outputs=Schema([ColSpec("string")]),
        params=ParamSchema([ParamSpec("max_new_tokens", "long", DEFAULT_MAX_NEW_TOKENS)]),
    )


class PrefixPyfuncModel(mlflow.pyfunc.PythonModel):
    """A frozen base model plus one trained prefix. Holds no state until `load_context`."""

    def load_context(self, context) -> None:
        from workers.devices import resolve_device
        from workers.formats import load_peft_adapter
        from workers.inject import PrefixedModel

        device = resolve_device(os.environ.get(DEVICE_ENV, "auto"))  # the GPU when the serving host has one
        ref, sha256 = read_base_model_record(context.artifacts[BASE_MODEL])
        model, tokenizer = load_recorded_base(ref, sha256)
        _, encoder = load_peft_adapter(context.artifacts[ADAPTER], model.config)
        self._prefixed = PrefixedModel(model.to(device))
        self._tokenizer = tokenizer
        self._prefix = encoder.prompt_embeddings().detach().to(device)  # [P, num_layers * 2 * token_dim]

    def predict(self, context, model_input: pd.DataFrame, params: Mapping[str, Any] | None = None) -> list[str]:
        """One generation per prompt, greedy; params: max_new_tokens (default 32).

        model_input arrives as a DataFrame after pyfunc's schema enforcement (a list of prompts becomes one
        column); `prompts_of` also takes a plain list. The DataFrame hint also tells MLflow not to infer a
        signature from type hints: the logged signature is `signature()`."""
        from workers.generate import generate_texts

        prompts = prompts_of(model_input)
        max_new_tokens = int((params or {}).get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS)
        if not prompts:
            return []
        return generate_texts(
            self._prefixed, self._tokenizer, [self._prefix], [0] * len(prompts), prompts, max_new_tokens=max_new_tokens
        )
