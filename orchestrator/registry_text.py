"""How `prefixd lookup` and `prefixd models` print, shared by the local commands (orchestrator/registry/)
and the same commands through `--server` (orchestrator/cli.py). No MLflow here: the remote commands must
not pay for importing it."""

from __future__ import annotations

from collections.abc import Iterable


def parse_tag_filters(items: Iterable[str]) -> dict[str, str]:
    """`--tag KEY=VALUE` values as a dict; ValueError naming the first malformed one."""
    tags = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--tag {item!r}: expected KEY=VALUE")
        tags[key] = value
    return tags


def print_version(info: dict) -> None:
    """One registered version (a `lookup` result), as text."""
    print(f"{info['name']} v{info['version']}" + (f" ({', '.join(info['aliases'])})" if info["aliases"] else ""))
    rows = [
        ("task", info["task"]),
        ("job", info["job_id"]),
        ("run", info["run_id"]),
        ("source", info["source"]),
        ("base model", info["base_model"]),
        ("base sha256", info["base_model_sha256"]),
    ]
    rows += [(k, f"{v:.6g}") for k, v in sorted(info["metrics"].items())]
    rows += [(f"tag {k}", v) for k, v in sorted(info["tags"].items()) if not k.startswith("prefixd.")]
    for key, value in rows:
        if value is not None:
            print(f"  {key:<14} {value}")


def print_models(models: list[dict], *, filtered: bool) -> None:
    """Registered models (a `models` result) as a table."""
    if not models:
        print("no registered prefixd models" + (" match" if filtered else ""))
        return
    header = ("MODEL", "TASK", "CHAMPION", "LATEST", "VERSIONS", "BASE MODEL")
    rows = [
        (
            m["name"],
            m["task"] or "",
            m["champion_version"] or "-",
            m["latest_version"],
            ",".join(m["versions"]),
            "; ".join(m["base_models"]),
        )
        for m in models
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
    for r in [header, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])
