"""`prefixd logs JOB [-f] [--json]`: print a job's events, from the local store or through the API, and with
`-f` follow them until the job reaches a final state.

The same function serves both: it is given the source's two reads, `events(job_id, after=, limit=)` ->
(events, has_more) and `job(job_id)` -> Job (JobStore.events/get, or ApiClient.events/status).

    print_events(store.events, store.get, job_id, follow=True)   # returns 0 once the job has ended
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import TextIO

from orchestrator.store import FINAL_STATES, Job, JobEvent

PAGE = 500
"""Events asked for per read."""
POLL_S = 2.0
"""Seconds between reads while following."""

ReadEvents = Callable[..., tuple[list[JobEvent], bool]]


def print_events(
    events: ReadEvents,
    job: Callable[[str], Job],
    job_id: str,
    *,
    follow: bool = False,
    as_json: bool = False,
    poll_s: float | None = None,
    out: TextIO | None = None,
) -> int:
    """Print the job's events, oldest first. With `follow`, keep printing new ones (read `after` the last id
    seen, every `poll_s`, default POLL_S) until the job is in a final state and all its events are printed.
    Text: one `time  level  message` line each. JSON: the whole list, indented; with `follow`, one object a
    line as they come. Returns the exit code, 0. UnknownJob (or the client's ApiError) passes through."""
    out = out or sys.stdout
    after, seen = None, []
    while True:
        # Read the state first: events recorded before it was final are then all in the reads that follow.
        ended = not follow or job(job_id).state in FINAL_STATES
        more = True
        while more:
            batch, more = events(job_id, after=after, limit=PAGE)
            if batch:
                after = batch[-1].id
            if as_json and not follow:
                seen += batch
            else:
                for event in batch:
                    print(json.dumps(event.to_dict(), allow_nan=False) if as_json else format_event(event), file=out)
            out.flush()
        if ended:
            break
        time.sleep(POLL_S if poll_s is None else poll_s)
    if as_json and not follow:
        print(json.dumps([e.to_dict() for e in seen], indent=2, allow_nan=False), file=out)
    return 0


def format_event(event: JobEvent) -> str:
    """`2026-01-02 03:04:05  warning  checkpoint at step 40 not written: ...` (local time)."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(event.created_at))
    return f"{stamp}  {event.level:<7}  {event.message}"
