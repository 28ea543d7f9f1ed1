#!/usr/bin/env python3
"""Container health check for the prefixd images. Exit status 0 means healthy.

    healthcheck.py [ROLE]        ROLE defaults to $PREFIXD_ROLE, else "head"

Roles and what each one checks, over loopback only, with the standard library only (the images
carry no curl or wget):
  head    the Ray GCS (dashboard /api/gcs_healthz), this node's raylet, and the prefixd API
  worker  this node's raylet (dashboard agent /api/local_raylet_healthz)
  mlflow  the MLflow server's /health
  gcs, raylet, api   one of the parts above

Ray's two health endpoints answer without the cluster token. The prefixd API counts as up when it
answers HTTP at all below 500 on $PREFIXD_HEALTH_PATH (default /healthz): a 401 or 404 still
shows a live server, and the check needs no API token.

Ports: PREFIXD_API_PORT (8765), RAY_DASHBOARD_PORT (8265), RAY_DASHBOARD_AGENT_LISTEN_PORT (52365),
MLFLOW_PORT (5000).
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

TIMEOUT_S = float(os.environ.get("PREFIXD_HEALTH_TIMEOUT", "5"))

# Never send a loopback check through a proxy from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _port(name: str, default: int) -> int:
    return int(os.environ.get(name) or default)


def http_status(url: str) -> int | None:
    """The HTTP status the URL answers with, or None when nothing answers."""
    request = urllib.request.Request(url, headers={"User-Agent": "prefixd-healthcheck"})
    try:
        with _OPENER.open(request, timeout=TIMEOUT_S) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code
    except (OSError, ValueError):
        return None


def check_gcs() -> str | None:
    url = f"http://127.0.0.1:{_port('RAY_DASHBOARD_PORT', 8265)}/api/gcs_healthz"
    status = http_status(url)
    return None if status == 200 else f"Ray GCS: {url} answered {status}"


def check_raylet() -> str | None:
    url = f"http://127.0.0.1:{_port('RAY_DASHBOARD_AGENT_LISTEN_PORT', 52365)}/api/local_raylet_healthz"
    status = http_status(url)
    return None if status == 200 else f"raylet: {url} answered {status}"


def check_api() -> str | None:
    path = os.environ.get("PREFIXD_HEALTH_PATH") or "/healthz"
    url = f"http://127.0.0.1:{_port('PREFIXD_API_PORT', 8765)}{path}"
    status = http_status(url)
    return None if status is not None and status < 500 else f"prefixd API: {url} answered {status}"


def check_mlflow() -> str | None:
    url = f"http://127.0.0.1:{_port('MLFLOW_PORT', 5000)}/health"
    status = http_status(url)
    return None if status == 200 else f"MLflow: {url} answered {status}"


ROLES = {
    "head": (check_gcs, check_raylet, check_api),
    "worker": (check_raylet,),
    "mlflow": (check_mlflow,),
    "gcs": (check_gcs,),
    "raylet": (check_raylet,),
    "api": (check_api,),
}


def main(argv: list[str]) -> int:
    role = argv[1] if len(argv) > 1 else (os.environ.get("PREFIXD_ROLE") or "head")
    if role not in ROLES:
        print(f"healthcheck: unknown role {role!r}; one of {', '.join(ROLES)}", file=sys.stderr)
        return 2
    problems = [p for p in (check() for check in ROLES[role]) if p]
    for problem in problems:
        print(f"unhealthy: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
