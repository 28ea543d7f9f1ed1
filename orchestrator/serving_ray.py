"""`prefixd serve-models` as a Ray Serve application: one deployment per base model, each with its own replicas,
each replica the same OpenAI-compatible app (orchestrator/serving.py) over the prefixes of its base.

    serve deploy docker/serve_models.yaml       # on the Ray head (docker/README.md)
    curl -H "Authorization: Bearer $TOKEN" http://head:8000/smollm2/v1/models

docker/serve_models.yaml lists the base models: for each, the route prefix its clients use as the OpenAI
base URL (`http://head:8000/<route>/v1`), its number of replicas and the Ray resources of one replica.
Every replica reads the tokens (PREFIXD_API_TOKENS / PREFIXD_ADMIN_TOKENS, or their _FILE forms) and the
registry (MLFLOW_TRACKING_URI) from its environment, as `prefixd serve-models` does: the environment `ray start`
ran in on its node, or the application's `runtime_env.env_vars` (docker/README.md: which nodes have which). It
answers 400 for a model of another base model, naming it. Ray Serve balances each deployment's requests over
its replicas; every replica batches its own requests continuously.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from fastapi import FastAPI
from ray import serve

from orchestrator.serving_models import ServingSettings


@serve.deployment
@serve.ingress()
class PrefixServer:
    """One replica: a ModelCatalog limited to one base model, served by the standalone app's routes.

    The app is built per replica (`__serve_build_asgi_app__`, called by Ray Serve after `__init__`): an app
    given to `serve.ingress(app)` is copied when the class is defined, so routes added to it later are lost.
    """

    def __init__(self, base: str, settings: dict[str, Any] | None = None):
        from orchestrator.serving_models import ModelCatalog
        from orchestrator.tenants import callers_from_env

        self.callers = callers_from_env()
        if not self.callers:
            raise RuntimeError("no token configured: set PREFIXD_API_TOKENS (or PREFIXD_ADMIN_TOKENS)")
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            raise RuntimeError("set MLFLOW_TRACKING_URI to the registry the prefixes are registered in")
        self.catalog = ModelCatalog(ServingSettings(tracking_uri=uri, only_base=base, **(settings or {})))

    def __serve_build_asgi_app__(self) -> FastAPI:
        from orchestrator.serving import create_serving_app

        return create_serving_app(self.catalog, self.callers)

    def __del__(self):
        catalog = getattr(self, "catalog", None)
        if catalog is not None:
            catalog.close()


def build_app(args: dict[str, Any]) -> serve.Application:
    """The application for ONE base model (Ray Serve's `import_path: orchestrator.serving_ray:build_app` with
    args {base, settings, num_replicas, ray_actor_options}); docker/serve_models.yaml lists one per base."""
    base = args.get("base")
    if not isinstance(base, str) or not base:
        raise ValueError("args.base: the base model's description 'kind:location@revision:dtype' is required")
    settings = args.get("settings") or {}
    accepted = {f.name for f in dataclasses.fields(ServingSettings)} - {"tracking_uri", "only_base"}
    if not isinstance(settings, dict):
        raise ValueError(f"args.settings: a mapping of serving settings is required, not {settings!r}")
    if set(settings) - accepted:
        unknown = ", ".join(sorted(set(settings) - accepted))
        raise ValueError(f"args.settings: unknown {unknown}; accepted keys: {', '.join(sorted(accepted))}")
    options = {
        "num_replicas": int(args.get("num_replicas", 1)),
        "ray_actor_options": dict(args.get("ray_actor_options", {"num_cpus": 2})),
        "name": args.get("name", "prefixd-serve-models"),
    }
    return PrefixServer.options(**options).bind(base, settings)
