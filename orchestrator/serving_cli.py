"""`prefixd serve-models`: the OpenAI-compatible endpoint over every registered prefix (orchestrator/serving.py).

    PREFIXD_API_TOKENS="alice=tok-a" prefixd serve-models [--host 127.0.0.1] [--port 8001] [--max-batch 64]

Imports nothing heavy until the command runs (the `prefixd` parser reads these arguments for every command).
Tokens come from the environment as for `prefixd serve --api` (orchestrator/tenants.py); the tracking URI is
--mlflow-uri, else $MLFLOW_TRACKING_URI, else the home's embedded store.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading


def add_serve_models_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address (default 127.0.0.1; put TLS in front of any other)")
    p.add_argument("--port", type=int, default=8001, help="port (default 8001)")
    p.add_argument(
        "--mlflow-uri", default=None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else the home's)"
    )
    p.add_argument("--max-prefixes", type=int, default=256, help="most prefixes kept loaded (LRU; default 256)")
    p.add_argument(
        "--max-prefix-mb", type=float, default=1024.0, help="most MiB of prefixes kept loaded (default 1024)"
    )
    p.add_argument("--alias-ttl", type=float, default=5.0, help="seconds an alias resolution is reused (default 5)")
    p.add_argument("--max-batch", type=int, default=64, help="most rows decoded together per base model (default 64)")
    p.add_argument("--max-queue", type=int, default=256, help="most waiting requests per base model; more get 429")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds a request may wait and decode (default 120)")
    p.add_argument("--max-tokens-limit", type=int, default=1024, help="largest max_tokens accepted (default 1024)")
    p.add_argument("--device", default="auto", help="auto (the GPU when there is one), cpu, cuda, cuda:N")


def serving_settings(args: argparse.Namespace, tracking_uri: str):
    """ServingSettings from the flags; ValueError naming a flag that is out of range."""
    from orchestrator.serving_models import ServingSettings

    for flag, value in (("--max-prefixes", args.max_prefixes), ("--max-batch", args.max_batch),
                        ("--max-queue", args.max_queue), ("--max-tokens-limit", args.max_tokens_limit)):  # fmt: skip
        if value < 1:
            raise ValueError(f"{flag} {value}: must be >= 1")
    for flag, value in (("--max-prefix-mb", args.max_prefix_mb), ("--timeout", args.timeout)):
        if not value > 0:
            raise ValueError(f"{flag} {value}: must be > 0")
    return ServingSettings(
        tracking_uri=tracking_uri,
        max_prefixes=args.max_prefixes,
        max_prefix_bytes=int(args.max_prefix_mb * (1 << 20)),
        alias_ttl_s=max(args.alias_ttl, 0.0),
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        timeout_s=args.timeout,
        max_tokens_limit=args.max_tokens_limit,
        device=args.device,
    )


def serving_catalog(config):
    """A ModelCatalog with default settings over the orchestrator config's registry (`serve --api --serve-models`)."""
    from orchestrator.serving_models import ModelCatalog, ServingSettings

    return ModelCatalog(ServingSettings(tracking_uri=config.tracking_uri))


def cmd_serve_models(args: argparse.Namespace) -> int:
    from orchestrator.api_server import ApiStartError
    from orchestrator.registry import tracking_uri_from_args
    from orchestrator.serving import start_serving
    from orchestrator.serving_models import ModelCatalog
    from orchestrator.tenants import ADMIN_TOKENS_ENV, TOKENS_ENV, callers_from_env

    uri = tracking_uri_from_args(args)
    try:
        settings = serving_settings(args, uri)
        callers = callers_from_env()
    except ValueError as e:
        print(f"prefixd serve-models: error: {e}", file=sys.stderr)
        return 2
    if not callers:
        print(
            f"prefixd serve-models: error: no token configured: set {TOKENS_ENV} (or {ADMIN_TOKENS_ENV})",
            file=sys.stderr,
        )
        return 2
    try:
        handle = start_serving(ModelCatalog(settings), callers, host=args.host, port=args.port)
    except (ApiStartError, ValueError) as e:  # a taken port, an unknown --device
        print(f"prefixd serve-models: error: {e}", file=sys.stderr)
        return 1
    print(f"serving registered prefixes on {handle.url}/v1 (registry {uri}; Ctrl-C to stop)", flush=True)
    stop = threading.Event()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        handle.stop()
    return 0
