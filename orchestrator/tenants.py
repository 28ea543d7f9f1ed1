"""Who is calling the HTTP API: bearer tokens -> tenants (and admins), and the operator's per-tenant quotas.

    PREFIXD_API_TOKENS="alice=tok-a1,bob=tok-b1,ci-token"   # name=token pairs; a bare token is its own tenant
    PREFIXD_API_TOKENS_FILE=/etc/prefixd/tokens             # the same entries, one per line ('#' comments)
    PREFIXD_ADMIN_TOKENS="ops=tok-o1"                       # admins see and control every tenant's jobs
    PREFIXD_ADMIN_TOKENS_FILE=/etc/prefixd/admin-tokens
    PREFIXD_QUOTAS=/etc/prefixd/quotas.yaml                 # {tenant or '*': {max_queued, max_running, max_priority}}

    callers = callers_from_env()             # {token: Caller(tenant='alice', admin=False), ...}
    quotas = read_quotas("quotas.yaml")      # {'alice': Quota(max_queued=20, ...), '*': Quota(...)}

An entry is `name=token` when the text before its first '=' is a tenant name (TENANT_PATTERN) and a token
follows; anything else is a bare token, whose tenant is named after a hash of it ('token-3f9a...'), so a
single bare token keeps working as one tenant, and the token itself is never stored. A tenant may have
several tokens (rotation); a token belongs to one tenant and one role. `prefixd submit` and the other
commands on the store's own machine act as the local admin, tenant LOCAL_TENANT.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.store import Quota

TOKENS_ENV = "PREFIXD_API_TOKENS"
TOKENS_FILE_ENV = "PREFIXD_API_TOKENS_FILE"
ADMIN_TOKENS_ENV = "PREFIXD_ADMIN_TOKENS"
ADMIN_TOKENS_FILE_ENV = "PREFIXD_ADMIN_TOKENS_FILE"
QUOTAS_ENV = "PREFIXD_QUOTAS"
LOCAL_TENANT = "local"
TENANT_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


@dataclass(frozen=True)
class Caller:
    """The tenant a request acts for; an admin sees and controls every tenant's jobs."""

    tenant: str
    admin: bool = False


def parse_entries(entries: Iterable[str], *, admin: bool = False, where: str = "tokens") -> dict[str, Caller]:
    """{token: Caller} from 'name=token' or bare-token entries; ValueError names the entry's position."""
    out: dict[str, Caller] = {}
    for i, raw in enumerate(entries, start=1):
        entry = raw.strip()
        if not entry:
            continue
        name, sep, token = entry.partition("=")
        if sep and token and re.fullmatch(TENANT_PATTERN, name):
            if name == LOCAL_TENANT or name.startswith("token-"):
                raise ValueError(
                    f"{where}: entry {i}: the tenant name {name!r} is reserved ('{LOCAL_TENANT}' is "
                    "the CLI on the store's machine, 'token-...' names bare tokens)"
                )
            caller = Caller(name, admin)
        else:
            token = entry
            caller = Caller("token-" + hashlib.sha256(token.encode()).hexdigest()[:12], admin)
        if any(ch.isspace() for ch in token):
            raise ValueError(f"{where}: entry {i} holds white space; a token is one word")
        if out.get(token, caller) != caller:
            raise ValueError(f"{where}: entry {i} gives a token already given to tenant {out[token].tenant!r}")
        out[token] = caller
    return out


def _file_entries(path: str) -> list[str]:
    text = Path(path).expanduser().read_text(encoding="utf-8")
    lines = (line.split("#", 1)[0] for line in text.splitlines())
    return [entry for line in lines for entry in line.split(",")]


def callers_from_env(env: Mapping[str, str] | None = None) -> dict[str, Caller]:
    """{token: Caller} from PREFIXD_API_TOKENS(_FILE) and PREFIXD_ADMIN_TOKENS(_FILE); ValueError on a
    conflicting or unreadable entry (the message never shows a token)."""
    env = os.environ if env is None else env
    out: dict[str, Caller] = {}
    for admin, value_env, file_env in (
        (False, TOKENS_ENV, TOKENS_FILE_ENV),
        (True, ADMIN_TOKENS_ENV, ADMIN_TOKENS_FILE_ENV),
    ):
        entries = env.get(value_env, "").split(",")
        if env.get(file_env):
            try:
                entries += _file_entries(env[file_env])
            except OSError as e:
                raise ValueError(f"{file_env}: cannot read {env[file_env]}: {e.strerror or e}") from None
        out = merge_callers(out, parse_entries(entries, admin=admin, where=f"{value_env}/{file_env}"))
    return out


def merge_callers(a: Mapping[str, Caller], b: Mapping[str, Caller]) -> dict[str, Caller]:
    """Both mappings; ValueError when one token is given two tenants or roles."""
    out = dict(a)
    for token, caller in b.items():
        if out.get(token, caller) != caller:

            def who(c: Caller) -> str:
                return f"{'admin' if c.admin else 'tenant'} {c.tenant!r}"

            raise ValueError(f"one token is given to {who(out[token])} and to {who(caller)}; a token has one owner")
        out[token] = caller
    return out


def read_quotas(path: str | Path) -> dict[str, Quota]:
    """{tenant: Quota} from a YAML or JSON file ('*' = every tenant not named):

        '*':   {max_queued: 50, max_running: 4, max_priority: 0}
        alice: {max_queued: 200, max_running: 8, max_priority: 100}

    ValueError names the file, the tenant, the setting and what is accepted."""
    from jobs.problems import SpecError
    from jobs.reader import read_spec_file

    try:
        data = read_spec_file(Path(path).expanduser())
    except SpecError as e:
        raise ValueError(f"quotas: {e}") from None
    try:
        return check_quotas(data)
    except ValueError as e:
        raise ValueError(f"{e} (in {path})") from None


def check_quotas(data: Any) -> dict[str, Quota]:
    """Validate {tenant: {setting: int >= 0 or null}} (max_priority: any int) as Quota objects."""
    if not isinstance(data, Mapping):
        raise ValueError("quotas: expected a mapping of tenant names (or '*') to settings")
    out, problems = {}, []
    fields = ("max_queued", "max_running", "max_priority")
    for tenant, settings in data.items():
        if tenant != "*" and not (isinstance(tenant, str) and re.fullmatch(TENANT_PATTERN, tenant)):
            problems.append(f"{tenant!r}: not a tenant name (or '*')")
            continue
        if isinstance(settings, Quota):
            out[tenant] = settings
            continue
        if not isinstance(settings, Mapping):
            problems.append(f"{tenant}: expected a mapping with keys {', '.join(fields)}")
            continue
        for key, value in settings.items():
            if key not in fields:
                problems.append(f"{tenant}.{key}: unknown setting; accepted: {', '.join(fields)}")
            elif value is not None and (
                not isinstance(value, int)
                or isinstance(value, bool)
                or abs(value) > 2**31 - 1
                or (key != "max_priority" and value < 0)
            ):
                problems.append(
                    f"{tenant}.{key}: expected an integer{' >= 0' if key != 'max_priority' else ''} "
                    f"or null, got {value!r}"
                )
        out[tenant] = Quota(
            **{
                k: v
                for k, v in settings.items()
                if k in fields and (v is None or (isinstance(v, int) and not isinstance(v, bool)))
            }
        )
    if problems:
        raise ValueError("quotas: " + "; ".join(problems))
    return out
