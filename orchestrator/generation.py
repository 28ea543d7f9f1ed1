"""Text from several tasks' registered prefixes over one base model, all rows in one mixed-prefix batch.

    generate(uri, ["past-tense", "reverse-words"], ["Past tense: walk\nAnswer:"], max_new_tokens=8)
    # [{'task': 'past-tense', 'name': 'prefixd-past-tense', 'version': '3', 'outputs': ['walked']}, ...]
    model = load_pyfunc(uri, "past-tense")          # the champion as an MLflow pyfunc model

Each task's version is resolved as `orchestrator.registry.lookup` does (default: the champion); the tasks'
prefixes must share one base model, which must be on this machine. Bad input raises RegistryError.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.pyfunc_model import ADAPTER, BASE_MODEL_FILE, describe_base, read_base_model_record
from orchestrator.registry.client import RegistryError, mlflow_client
from orchestrator.registry.lookup import check_selector, download_model, resolve_name, resolve_version, version_dict
from workers.models import ModelLoadError


@dataclass
class GenerationSet:
    """Everything `generate_texts` needs for several tasks' registered prefixes over one base model."""

    prefixed: Any
    """workers.inject.PrefixedModel over the loaded base model."""
    tokenizer: Any
    prefixes: list[Any]
    """One tensor [P_j, num_layers * 2 * token_dim] per task, in the order asked."""
    versions: list[dict[str, Any]]
    """lookup() of each task's version, same order."""
    base_model: str


def load_prefixes_for_generation(
    tracking_uri: str,
    tasks: Sequence[str],
    alias: str | None = None,
    version: str | int | None = None,
    device: str = "auto",
) -> GenerationSet:
    """Resolve each task's version (alias, default champion; a version only with one task), download
    the prefixes, load their common base model once, on `device` ('auto': the GPU when there is one,
    `workers.devices.resolve_device`). RegistryError when the tasks' base models differ, the base model is
    not on this machine (naming it), or the device is not available."""
    from orchestrator.pyfunc_model import load_recorded_base
    from workers.devices import resolve_device
    from workers.formats import PrefixFormatError, load_peft_adapter
    from workers.inject import PrefixedModel

    tasks = list(tasks)
    if not tasks:
        raise RegistryError("give at least one task")
    try:
        where = resolve_device(device)
    except ValueError as e:
        raise RegistryError(str(e)) from None
    check_selector(alias, version)
    if version is not None and len(tasks) > 1:
        raise RegistryError(
            f"a version number names one model's version; got {len(tasks)} tasks "
            "(use an alias such as champion for several)"
        )
    with mlflow_client(tracking_uri) as client, tempfile.TemporaryDirectory(prefix="prefixd-gen-") as tmp:
        picked = []
        for i, task in enumerate(tasks):
            name = resolve_name(client, task)
            mv, _ = resolve_version(client, name, alias, version)
            artifacts = download_model(client, tracking_uri, name, mv, Path(tmp) / str(i))
            ref, sha256 = read_base_model_record(artifacts / BASE_MODEL_FILE)
            picked.append((name, mv, artifacts, ref, sha256))
        bases = {describe_base(ref) for *_, ref, _ in picked}
        if len(bases) > 1:
            which = "; ".join(f"{name} v{mv.version}: {describe_base(ref)}" for name, mv, _, ref, _ in picked)
            raise RegistryError(
                f"the tasks' prefixes belong to different base models ({which}); generate for one base model at a time"
            )
        name, mv, _, ref, sha256 = picked[0]
        try:
            model, tokenizer = load_recorded_base(ref, sha256)
        except ModelLoadError as e:
            raise RegistryError(f"{name} v{mv.version}: {e}") from None
        prefixes = []
        for name, mv, artifacts, _, _ in picked:
            try:
                _, encoder = load_peft_adapter(artifacts / ADAPTER, model.config)
            except PrefixFormatError as e:
                raise RegistryError(f"{name} v{mv.version}: {e}") from None
            prefixes.append(encoder.prompt_embeddings().detach().to(where))
        versions = [version_dict(client, name, mv) for name, mv, *_ in picked]
    return GenerationSet(
        prefixed=PrefixedModel(model.to(where)),
        tokenizer=tokenizer,
        prefixes=prefixes,
        versions=versions,
        base_model=describe_base(ref),
    )


def generate(
    tracking_uri: str,
    tasks: Sequence[str],
    prompts: Sequence[str],
    *,
    alias: str | None = None,
    version: str | int | None = None,
    max_new_tokens: int = 32,
    with_base: bool = False,
    device: str = "auto",
) -> list[dict[str, Any]]:
    """Every prompt with every task's prefix, all rows in ONE mixed-prefix batch; per task (in the order
    given): {task, name, version, outputs: [text per prompt]}. with_base adds a last entry (task None)
    with the base model's own outputs, for comparison."""
    from workers.generate import generate_texts

    prompts = list(prompts)
    if not prompts:
        raise RegistryError("give at least one prompt")
    gs = load_prefixes_for_generation(tracking_uri, tasks, alias, version, device)
    owners = [j for j in range(len(tasks)) for _ in prompts]  # row order: task-major
    texts = generate_texts(
        gs.prefixed,
        gs.tokenizer,
        gs.prefixes,
        owners,
        prompts * len(tasks),
        max_new_tokens=max_new_tokens,
        batch_size=len(owners),
    )
    n = len(prompts)
    results = [
        {"task": task, "name": v["name"], "version": v["version"], "outputs": texts[j * n : (j + 1) * n]}
        for j, (task, v) in enumerate(zip(tasks, gs.versions))
    ]
    if with_base:
        bare = generate_texts(
            gs.prefixed, gs.tokenizer, None, None, prompts, max_new_tokens=max_new_tokens, batch_size=n
        )
        results.append({"task": None, "name": "base model, no prefix", "version": None, "outputs": bare})
    return results


def load_pyfunc(tracking_uri: str, task_or_model: str, alias: str | None = None, version: str | int | None = None):
    """mlflow.pyfunc.load_model of a task's version (default: the champion) from this tracking URI."""
    import mlflow

    check_selector(alias, version)
    with mlflow_client(tracking_uri) as client:
        name = resolve_name(client, task_or_model)
        mv, asked = resolve_version(client, name, alias, version)
        uri = f"models:/{name}@{asked[1:]}" if asked.startswith("@") else f"models:/{name}/{mv.version}"
        try:
            return mlflow.pyfunc.load_model(uri)
        except ModelLoadError as e:
            raise RegistryError(f"{name} v{mv.version}: {e}") from None
