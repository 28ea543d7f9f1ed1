"""Lookups: a task's registered version, the registered models, and a version's adapter files.

    lookup(uri, "past-tense")                           # the champion, as a dict
    lookup(uri, "past-tense", alias="latest")           # or version=3
    search_models(uri, base="builtin:smollm2-135m", tags={"team": "nlp"})
    download(uri, "past-tense", dst="adapter/")         # PEFT adapter files + base_model.json

Names. A lookup takes a registered-model name or a task name: an existing registered model of exactly
that name; else the one registered model tagged prefixd.task=<task> (a spec may set its own
registry.model_name); else 'prefixd-<task>'. With neither alias nor version, a lookup means the champion.
Bad input (unknown task, alias or version, an invalid alias) raises RegistryError.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from jobs.spec import REGISTERED_NAME_PREFIX
from orchestrator.pyfunc_model import ADAPTER, BASE_MODEL_FILE
from orchestrator.registry.client import (
    ALIAS_PATTERN,
    BASE_TAG,
    CHAMPION,
    JOB_TAG,
    LATEST,
    METRIC_TAG,
    SHA_TAG,
    TASK_TAG,
    RegistryError,
    is_unreachable,
    metric_of,
    mlflow_client,
    quote,
    registered_model,
)


def resolve_name(client, task_or_model: str) -> str:
    """A registered-model name from a model or task name (rule in the module docstring)."""
    if not isinstance(task_or_model, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,255}", task_or_model):
        raise RegistryError(
            f"{task_or_model!r} is not a task or model name (letters, digits, '_', '.' and '-', "
            "starting with a letter or digit)"
        )
    if registered_model(client, task_or_model) is not None:
        return task_or_model
    tagged = [m.name for m in _all_models(client, f"tags.`{TASK_TAG}` = {quote(task_or_model)}")]
    if len(tagged) == 1:
        return tagged[0]
    if len(tagged) > 1:
        raise RegistryError(
            f"task {task_or_model!r} has several registered models ({', '.join(sorted(tagged))}); give the model name"
        )
    default = REGISTERED_NAME_PREFIX + task_or_model
    if registered_model(client, default) is not None:
        return default
    known = sorted(m.name for m in _all_models(client) if TASK_TAG in (m.tags or {}))
    raise RegistryError(
        f"no registered model for task or model {task_or_model!r} (looked for a model of that "
        f"name, one tagged {TASK_TAG}={task_or_model}, and {default!r}); known: "
        f"{', '.join(known) or 'none'}"
    )


def _all_models(client, filter_string: str | None = None) -> list[Any]:
    out, token = [], None
    while True:
        page = client.search_registered_models(filter_string=filter_string, max_results=100, page_token=token)
        out.extend(page)
        token = page.token
        if not token:
            return out


def _versions(client, name: str) -> list[Any]:
    return sorted(client.search_model_versions(f"name = {quote(name)}"), key=lambda v: int(v.version))


def check_alias(alias: str) -> str:
    if not isinstance(alias, str) or not re.fullmatch(ALIAS_PATTERN, alias) or re.fullmatch(r"[vV]\d+", alias):
        raise RegistryError(
            f"alias {alias!r} is not a valid alias name: use letters, digits, '_' and '-' "
            "(at most 255; 'v<number>' is reserved), e.g. champion or latest"
        )
    return alias


def check_selector(alias: str | None, version: str | int | None) -> None:
    """Refuse a bad alias/version before asking MLflow anything."""
    if alias is not None and version is not None:
        raise RegistryError(f"give an alias or a version, not both (got @{alias} and version {version})")
    if alias is not None:
        check_alias(alias)
    if version is not None and (not str(version).isdigit() or int(str(version)) < 1):
        raise RegistryError(f"version {version!r}: a version is a positive integer")


def resolve_version(client, name: str, alias: str | None, version: str | int | None):
    """(ModelVersion, how it was asked for: '@alias' or 'v<N>')."""
    if alias is not None and version is not None:
        raise RegistryError(f"{name}: give an alias or a version, not both (got @{alias} and version {version})")
    versions = [str(v.version) for v in _versions(client, name)]
    if not versions:
        raise RegistryError(f"registered model {name!r} has no versions")
    if version is not None:
        text = str(version)
        if not text.isdigit() or int(text) < 1:
            raise RegistryError(
                f"version {version!r} of {name}: a version is a positive integer; its versions: {', '.join(versions)}"
            )
        if str(int(text)) not in versions:
            raise RegistryError(f"{name} has no version {text}; its versions: {', '.join(versions)}")
        return client.get_model_version(name, str(int(text))), f"v{int(text)}"
    alias = check_alias(CHAMPION if alias is None else alias)
    aliases = client.get_registered_model(name).aliases
    if alias.lower() != LATEST and alias not in aliases:
        shown = ", ".join(sorted(aliases) + [LATEST])
        raise RegistryError(f"{name} has no alias {alias!r}; its aliases: {shown}")
    return client.get_model_version_by_alias(name, alias), f"@{alias}"


def version_dict(client, name: str, mv) -> dict[str, Any]:
    model = client.get_registered_model(name)
    newest = max(int(v.version) for v in _versions(client, name))
    version = str(mv.version)
    aliases = sorted(a for a, v in model.aliases.items() if str(v) == version)
    if int(version) == newest:
        aliases.append(LATEST)
    tags = dict(mv.tags or {})
    return {
        "name": name,
        "version": version,
        "aliases": aliases,
        "task": tags.get(TASK_TAG),
        "job_id": tags.get(JOB_TAG),
        "base_model": tags.get(BASE_TAG),
        "base_model_sha256": tags.get(SHA_TAG),
        "metrics": {
            k[len(METRIC_TAG) :]: m
            for k in tags
            if k.startswith(METRIC_TAG) and (m := metric_of(mv, k[len(METRIC_TAG) :])) is not None
        },
        "tags": tags,
        "run_id": mv.run_id,
        "source": mv.source,
        "description": mv.description,
        "created": mv.creation_timestamp,
    }


def lookup(
    tracking_uri: str, task_or_model: str, alias: str | None = None, version: str | int | None = None
) -> dict[str, Any]:
    """One registered version as a dict: name, version, aliases (with 'latest' on the newest), task,
    job_id, base_model, base_model_sha256, metrics (final), tags, run_id, source, description, created.
    Neither alias nor version: the champion."""
    check_selector(alias, version)
    with mlflow_client(tracking_uri) as client:
        name = resolve_name(client, task_or_model)
        mv, _ = resolve_version(client, name, alias, version)
        return version_dict(client, name, mv)


def _base_matches(base: str, described: str | None) -> bool:
    """BASE matches 'kind:location@revision:dtype' when equal to it, to a leading part of it
    ('builtin:smollm2-135m', 'path:/models/x'), or to its location alone."""
    if not described:
        return False
    if described == base or described.startswith(base + ":") or described.startswith(base + "@"):
        return True
    kind, _, rest = described.partition(":")
    location = rest.rsplit(":", 1)[0].split("@", 1)[0]
    return base == location


def search_models(
    tracking_uri: str, base: str | None = None, tags: Mapping[str, str] | None = None
) -> list[dict[str, Any]]:
    """prefixd's registered models (those tagged prefixd.task), by name, each with: name, task,
    description, tags, aliases ({alias: version}, 'latest' included), latest_version, champion_version,
    versions (those matching the filters) and base_models (theirs). `base` (see _base_matches) and
    `tags` (all must match; the version's tags, so the spec's own tags work) filter versions; a model
    without a matching version is left out."""
    tags = dict(tags or {})
    out = []
    with mlflow_client(tracking_uri) as client:
        for model in sorted(_all_models(client), key=lambda m: m.name):
            if TASK_TAG not in (model.tags or {}):
                continue
            versions = _versions(client, model.name)
            if not versions:
                continue
            matching = [
                v
                for v in versions
                if (base is None or _base_matches(base, (v.tags or {}).get(BASE_TAG)))
                and all((v.tags or {}).get(k) == val for k, val in tags.items())
            ]
            if not matching:
                continue
            latest = str(versions[-1].version)
            aliases = {a: str(v) for a, v in model.aliases.items()} | {LATEST: latest}
            out.append(
                {
                    "name": model.name,
                    "task": model.tags.get(TASK_TAG),
                    "description": model.description,
                    "tags": dict(model.tags),
                    "aliases": aliases,
                    "latest_version": latest,
                    "champion_version": aliases.get(CHAMPION),
                    "versions": [str(v.version) for v in matching],
                    "base_models": sorted({(v.tags or {}).get(BASE_TAG, "?") for v in matching}),
                }
            )
    return out


def download_model(client, tracking_uri: str, name: str, mv, dst: Path) -> Path:
    """The version's logged model files into dst; returns dst/artifacts."""
    import mlflow

    try:
        mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{name}/{mv.version}",
            dst_path=str(dst),
            tracking_uri=tracking_uri,
            registry_uri=tracking_uri,
        )
    except Exception as e:
        if is_unreachable(e):
            raise
        raise RegistryError(f"{name} v{mv.version}: cannot download its model from {mv.source}: {e}") from None
    artifacts = dst / "artifacts"
    if not (artifacts / ADAPTER).is_dir() or not (artifacts / BASE_MODEL_FILE).is_file():
        raise RegistryError(
            f"{name} v{mv.version}: its model at {mv.source} is not a prefixd prefix "
            f"(no artifacts/{ADAPTER}/ or artifacts/{BASE_MODEL_FILE})"
        )
    return artifacts


def download(
    tracking_uri: str,
    task_or_model: str,
    alias: str | None = None,
    version: str | int | None = None,
    dst: str | Path = ".",
) -> Path:
    """Put the version's PEFT adapter files (adapter_config.json, adapter_model.safetensors) and its
    base_model.json into folder `dst` (created if needed; those files overwritten); returns dst, ready
    for `peft.PeftModel.from_pretrained(base_model, dst)`."""
    check_selector(alias, version)
    dst = Path(dst)
    if dst.exists() and not dst.is_dir():
        raise RegistryError(f"download folder {dst}: exists and is not a folder")
    with mlflow_client(tracking_uri) as client:
        name = resolve_name(client, task_or_model)
        mv, _ = resolve_version(client, name, alias, version)
        with tempfile.TemporaryDirectory(prefix="prefixd-download-") as tmp:
            artifacts = download_model(client, tracking_uri, name, mv, Path(tmp))
            dst.mkdir(parents=True, exist_ok=True)
            for f in (artifacts / ADAPTER).iterdir():
                if f.is_file():
                    shutil.copy2(f, dst / f.name)
            shutil.copy2(artifacts / BASE_MODEL_FILE, dst / BASE_MODEL_FILE)
    return dst
