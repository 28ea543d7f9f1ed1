"""What `prefixd serve-models` keeps in memory: one base model per base key, each driven by one decoding
thread (workers/decode.py), and the registered prefixes in an LRU, resolved from the MLflow registry.

    catalog = ModelCatalog(ServingSettings(tracking_uri=uri))
    served = catalog.get("capitals@champion", caller)   # ModelNotFound (404) / ModelRefused (400)
    ticket = served.engine.submit(rows, deliver, timeout_s=60.0)   # QueueFull (429)

Names. `model` is a task (or registered-model) name, optionally `@alias` or `:version`; without either it
means `@champion`. What a caller may use and sees listed: the registered models its tenant owns (tag
prefixd.owner), those of the local tenant (trained through the CLI on the store's machine) and those without
an owner; an admin: every model. A name is resolved (registry.lookup) on first use; every `alias_ttl_s`
seconds one background refresh re-reads every alias and owner from one listing of the registered models
(requests meanwhile use what they have), so a moved alias is served within about that time; the registry's listing
(GET /v1/models, the names an unknown model's 404 lists) is reused as long. Each (model, version) is
downloaded once and kept in the LRU, bounded by
`max_prefixes` and `max_prefix_bytes` (least recently used out first; running rows keep their tensor).

Engines. Each base model runs in its own thread: requests wait in a queue bounded by `max_queue`
(QueueFull past it), join the running batch at the next decoding step while it has fewer than
`max_batch` rows, and leave when done, cancelled or past their deadline. Events reach the caller
through `deliver(index, token, finish_reason)`: token None with a reason ends that row; index -1 with
reason 'timeout' ends the whole request.
"""

from __future__ import annotations

import collections
import re
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from orchestrator import registry
from orchestrator.pyfunc_model import describe_base, load_recorded_base, read_base_model_record
from orchestrator.serving_metrics import ServingMetrics
from orchestrator.tenants import LOCAL_TENANT
from workers.decode import ContinuousBatcher, Row
from workers.devices import resolve_device
from workers.formats import PrefixFormatError, load_peft_adapter
from workers.inject import PrefixedModel
from workers.models import ModelLoadError

MODEL_PATTERN = r"^(?P<task>[A-Za-z0-9][A-Za-z0-9_.-]{0,255}?)(?:@(?P<alias>[A-Za-z0-9_-]{1,255})|:(?P<version>\d+))?$"


@dataclass(frozen=True, kw_only=True)
class ServingSettings:
    """The serving knobs (`prefixd serve-models --help` names each flag)."""

    tracking_uri: str
    max_prefixes: int = 256
    """Most prefixes kept loaded (LRU)."""
    max_prefix_bytes: int = 1 << 30
    """Most bytes of prefix tensors kept loaded (LRU)."""
    alias_ttl_s: float = 5.0
    """How long an alias resolution is reused before the registry is asked again."""
    max_batch: int = 64
    """Most rows decoded together per base model."""
    max_queue: int = 256
    """Most requests waiting for room in the batch, per base model; more get 429."""
    timeout_s: float = 120.0
    """Most seconds a request may wait and decode, in all."""
    max_tokens_limit: int = 1024
    """Largest max_tokens a request may ask for."""
    device: str = "auto"
    """Where base models run: auto, cpu, cuda, cuda:N."""
    only_base: str | None = None
    """Serve only prefixes of this base model ('kind:location@revision:dtype'); others answer 400 naming
    it (a Ray Serve deployment per base model, docker/serve_models.yaml)."""


class ModelNotFound(LookupError):
    """No such model for this caller (404)."""


class ModelRefused(ValueError):
    """A model name or selector that cannot be served (400)."""


class QueueFull(RuntimeError):
    """The base model's queue is full (429)."""


# ------------------------------------------------------------------------------------------------ engine


@dataclass(eq=False)
class Ticket:
    """One request in an engine: its rows (one per choice), where events go, and its deadline."""

    rows: list[Row]
    deliver: Callable[[int, int | None, str | None], None]
    deadline: float
    model: str
    enqueued: float = field(default_factory=time.monotonic)
    cancelled: bool = False

    def cancel(self) -> None:
        """Stop decoding its rows (at the next step); no more events are delivered."""
        self.cancelled = True


class Engine:
    """One base model, one decoding thread, continuous batching over every prefix of that base."""

    def __init__(self, prefixed: PrefixedModel, tokenizer: Any, base: str, settings: ServingSettings, metrics):
        self.prefixed, self.tokenizer, self.base = prefixed, tokenizer, base
        self.settings, self.metrics = settings, metrics
        self.batcher = ContinuousBatcher(prefixed, eos_token_id=tokenizer.eos_token_id)
        self.context_length = prefixed.shape.context_length
        self._waiting: collections.deque[Ticket] = collections.deque()
        self._owner: dict[int, tuple[Ticket, int]] = {}  # id(row) -> (ticket, choice index)
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name=f"prefixd-decode-{base}", daemon=True)
        self._thread.start()

    def submit(self, rows: Sequence[Row], deliver, *, model: str, timeout_s: float | None = None) -> Ticket:
        if len(rows) > self.settings.max_batch:
            raise ModelRefused(
                f"n: {len(rows)} rows in one request; this server decodes at most {self.settings.max_batch}"
            )
        ticket = Ticket(list(rows), deliver, time.monotonic() + (timeout_s or self.settings.timeout_s), model)
        with self._cond:
            if len(self._waiting) >= self.settings.max_queue:
                self.metrics.rejected("queue_full")
                raise QueueFull(
                    f"the queue for base model {self.base} is full ({self.settings.max_queue} requests waiting); retry later"
                )
            self._waiting.append(ticket)
            self.metrics.queue_depth(self.base, len(self._waiting))
            self._cond.notify()
        return ticket

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(10)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stop and not self._waiting and not self.batcher.rows:
                    self._cond.wait()
                if self._stop:
                    return
                joining = self._take()
                self.metrics.queue_depth(self.base, len(self._waiting))
            try:
                self._drop_finished_or_late()
                if joining:
                    now = time.monotonic()
                    for t in joining:
                        self.metrics.queued(now - t.enqueued)
                    self._deliver(self.batcher.add([r for t in joining for r in t.rows]))
                if self.batcher.rows:
                    started = time.perf_counter()
                    events = self.batcher.step()
                    self.metrics.step(len(events), time.perf_counter() - started)
                    self._deliver(events)
            except Exception as e:  # noqa: BLE001 - one bad step fails its requests, not the server
                self._fail_all(f"decoding failed: {type(e).__name__}: {e}")

    def _take(self) -> list[Ticket]:
        """Waiting requests that fit the batch now (in order); late ones are answered 'timeout'."""
        room = self.settings.max_batch - len(self.batcher.rows)
        out, now = [], time.monotonic()
        while self._waiting:
            t = self._waiting[0]
            if t.cancelled or now > t.deadline:
                self._waiting.popleft()
                if not t.cancelled:
                    t.deliver(-1, None, "timeout")
                continue
            if len(t.rows) > room:
                break
            self._waiting.popleft()
            room -= len(t.rows)
            for i, row in enumerate(t.rows):
                self._owner[id(row)] = (t, i)
            out.append(t)
        return out

    def _drop_finished_or_late(self) -> None:
        now, gone = time.monotonic(), []
        for row in self.batcher.rows:
            ticket, _ = self._owner[id(row)]
            if ticket.cancelled or row.done:
                gone.append(row)
            elif now > ticket.deadline:
                gone.append(row)
                ticket.cancel()
                ticket.deliver(-1, None, "timeout")
        self._forget(gone)

    def _deliver(self, events) -> None:
        done = []
        for row, token in events:
            ticket, index = self._owner[id(row)]
            if token is not None:
                self.metrics.tokens(ticket.model, 1)
            if not ticket.cancelled:
                ticket.deliver(index, token, row.finish_reason)
            if row.done:
                done.append(row)
        self._forget(done)

    def _forget(self, rows: list[Row]) -> None:
        if rows:
            self.batcher.remove(rows)
            for row in rows:
                self._owner.pop(id(row), None)

    def _fail_all(self, message: str) -> None:
        tickets = {id(t): t for t, _ in self._owner.values()}
        self._forget(list(self.batcher.rows))
        self._owner.clear()
        for t in tickets.values():
            t.cancel()
            t.deliver(-1, None, "error: " + message)


# ------------------------------------------------------------------------------------------------ catalog


@dataclass(frozen=True)
class Served:
    """A resolved model: registered name and version, its prefix [P, F] and the engine of its base."""

    model: str
    name: str
    version: str
    prefix: torch.Tensor
    engine: Engine


class ModelCatalog:
    """Model names -> prefixes and engines (module docstring)."""

    def __init__(self, settings: ServingSettings, metrics: ServingMetrics | None = None):
        self.settings = settings
        self.metrics = metrics or ServingMetrics()
        self.device = resolve_device(settings.device)
        self._lock = threading.Lock()
        self._listing: tuple[float, list[dict]] | None = None
        self._names: dict[tuple, tuple[str, str, str | None]] = {}  # (task, alias, version) -> name, version, owner
        self._refreshed_at = time.monotonic()
        self._refreshing = False
        self._prefixes: collections.OrderedDict[tuple[str, str], tuple[torch.Tensor, str]] = collections.OrderedDict()
        self._engines: dict[str, Engine] = {}
        self._locks: dict[Any, threading.Lock] = {}

    def _lock_of(self, key: Any) -> threading.Lock:
        """One lock per key (a name, a prefix, a base model), made once."""
        with self._lock:
            return self._locks.setdefault(key, threading.Lock())

    # names
    def listing(self) -> list[dict]:
        """search_models() of the registry, reused for alias_ttl_s seconds (one refresh at a time)."""
        with self._lock_of("listing"):
            cached = self._listing
            if cached is None or time.monotonic() - cached[0] > self.settings.alias_ttl_s:
                cached = self._listing = (time.monotonic(), registry.search_models(self.settings.tracking_uri))
        return cached[1]

    @staticmethod
    def visible(owner: str | None, caller: Any) -> bool:
        """Whether a model of this owner (its prefixd.owner tag) is the caller's to use and see."""
        return caller is None or caller.admin or owner in (None, LOCAL_TENANT, caller.tenant)

    def visible_ids(self, caller: Any) -> list[str]:
        listing = self.listing()
        return sorted(
            {m["task"] or m["name"] for m in listing if self.visible(m["tags"].get(registry.OWNER_TAG), caller)}
        )

    def resolve(self, model: str, caller: Any) -> tuple[str, str]:
        """(registered name, version) for a `model` string; ModelNotFound / ModelRefused (module docstring:
        how long a resolution is reused)."""
        found = re.fullmatch(MODEL_PATTERN, model) if isinstance(model, str) else None
        if found is None:
            raise ModelRefused(
                f"model: {model!r} is not a model name; accepted: a task name, optionally with @alias or "
                ":version, e.g. capitals, capitals@champion, capitals:3"
            )
        task, alias, version = found["task"], found["alias"], found["version"]
        key = (task, alias, version)
        with self._lock_of(("name", key)):
            cached = self._names.get(key)
            if cached is None:
                cached = self._names[key] = self._lookup(task, alias, version, caller)
        with self._lock:
            due = time.monotonic() - self._refreshed_at > self.settings.alias_ttl_s and not self._refreshing
            self._refreshing = self._refreshing or due
        if due:  # served from the cache meanwhile; one refresh of every alias at a time, in the background
            threading.Thread(target=self._refresh, name="prefixd-aliases", daemon=True).start()
        if not self.visible(cached[2], caller):
            ids = ", ".join(self.visible_ids(caller)) or "none"
            raise ModelNotFound(f"model: no model {task!r}; the models you can use: {ids}")
        return cached[0], cached[1]

    def _lookup(self, task: str, alias: str | None, version: str | None, caller: Any) -> tuple:
        """(registered name, version, owner) from the registry; ModelNotFound naming what exists."""
        try:
            info = registry.lookup(self.settings.tracking_uri, task, alias=alias, version=version)
            owner = registry.model_owner(self.settings.tracking_uri, info["name"])
        except registry.RegistryError as e:
            ids = self.visible_ids(caller)
            if task in ids:  # the model exists for this caller: its alias or version does not
                raise ModelNotFound(f"model: {e}") from None
            raise ModelNotFound(
                f"model: no model {task!r}; the models you can use: {', '.join(ids) or 'none'}"
            ) from None
        return info["name"], str(info["version"]), owner

    def _refresh(self) -> None:
        """Every resolved alias (and owner) from one paged listing of the registered models; `latest`
        from a lookup; an alias that is gone is forgotten (its next request resolves it, and hears why)."""
        from mlflow import MlflowClient

        try:
            uri = self.settings.tracking_uri
            client, models, token = MlflowClient(uri, uri), {}, None
            while True:
                page = client.search_registered_models(max_results=1000, page_token=token)
                models.update({m.name: m for m in page})
                if not (token := page.token):
                    break
            for key, (name, version, _) in list(self._names.items()):
                task, alias, fixed = key
                model = models.get(name)
                if fixed is None and model is not None and alias == registry.LATEST:
                    try:
                        fresh = self._lookup(task, alias, None, None)
                    except ModelNotFound:
                        fresh = None
                elif model is not None and (fixed is not None or (alias or registry.CHAMPION) in model.aliases):
                    now = version if fixed is not None else str(model.aliases[alias or registry.CHAMPION])
                    fresh = (name, now, (model.tags or {}).get(registry.OWNER_TAG))
                else:
                    fresh = None
                with self._lock_of(("name", key)):
                    if fresh is None:
                        self._names.pop(key, None)
                    else:
                        self._names[key] = fresh
        except Exception:  # noqa: BLE001 - registry unreachable: keep serving what was resolved, retry later
            pass
        finally:
            with self._lock:
                self._refreshed_at, self._refreshing = time.monotonic(), False

    def get(self, model: str, caller: Any) -> Served:
        name, version = self.resolve(model, caller)
        prefix, base = self._prefix(name, version)
        return Served(model=model, name=name, version=version, prefix=prefix, engine=self._engines[base])

    # prefixes and bases
    def _prefix(self, name: str, version: str) -> tuple[torch.Tensor, str]:
        key = (name, version)
        with self._lock_of(key):
            with self._lock:
                if key in self._prefixes:
                    self._prefixes.move_to_end(key)
                    return self._prefixes[key]
            with tempfile.TemporaryDirectory(prefix="prefixd-serve-") as tmp:
                folder = registry.download(self.settings.tracking_uri, name, version=version, dst=Path(tmp))
                ref, sha256 = read_base_model_record(folder / "base_model.json")
                base = describe_base(ref)
                if self.settings.only_base is not None and base != self.settings.only_base:
                    raise ModelRefused(f"model: {name} v{version} belongs to base model {base}, not served here")
                engine = self._engine(base, ref, sha256)
                try:
                    _, encoder = load_peft_adapter(folder, engine.prefixed.model.config)
                except PrefixFormatError as e:
                    raise ModelRefused(f"model: {name} v{version}: {e}") from None
            prefix = encoder.prompt_embeddings().detach().to(self.device)  # [P, num_layers * 2 * token_dim]
            with self._lock:
                self._prefixes[key] = (prefix, base)
                self._evict()
            self.metrics.loaded(len(self._prefixes), self._bytes())
            return prefix, base

    def _bytes(self) -> int:
        return sum(p.nelement() * p.element_size() for p, _ in self._prefixes.values())

    def _evict(self) -> None:
        while len(self._prefixes) > 1 and (
            len(self._prefixes) > self.settings.max_prefixes or self._bytes() > self.settings.max_prefix_bytes
        ):
            self._prefixes.popitem(last=False)
            self.metrics.evicted()

    def loaded(self) -> list[tuple[str, str]]:
        """The (name, version) pairs in memory, least recently used first."""
        with self._lock:
            return list(self._prefixes)

    def _engine(self, base: str, ref, sha256) -> Engine:
        with self._lock_of(("base", base)):
            if base not in self._engines:
                try:
                    model, tokenizer = load_recorded_base(ref, sha256)
                except ModelLoadError as e:
                    raise ModelRefused(f"model: {e}") from None
                prefixed = PrefixedModel(model.to(self.device).eval())
                if prefixed.seq2seq:
                    raise ModelRefused(
                        f"model: base model {base} is an encoder-decoder; serve-models serves decoder-only "
                        "models (use `prefixd generate` or the pyfunc model)"
                    )
                self._engines[base] = Engine(prefixed, tokenizer, base, self.settings, self.metrics)
            return self._engines[base]

    def engines(self) -> dict[str, Engine]:
        return dict(self._engines)

    def close(self) -> None:
        for engine in self._engines.values():
            engine.stop()
