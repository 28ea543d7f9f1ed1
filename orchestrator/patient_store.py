"""The job store as a worker group uses it: patient with a database that is briefly out of reach."""

from __future__ import annotations

import logging
import time

from orchestrator.errors import first_line
from orchestrator.store import JobStore

log = logging.getLogger("prefixd.group")


class PatientStore:
    """The job store as a group uses it: a call that fails because the database is unreachable or busy
    (SQLAlchemy's OperationalError, InterfaceError) is retried with backoff for up to `patience_s`, so a
    database hiccup costs no job an attempt; the store's own answers (InvalidTransition, UnknownJob) and
    any other error pass at once. Other attributes are the store's.

        store = PatientStore(JobStore(url), patience_s=60)
        store.update_progress(job_id, step=3, ...)   # waits out a database restart of up to a minute
    """

    def __init__(self, store: JobStore, patience_s: float):
        self._store, self._patience_s = store, patience_s

    def __getattr__(self, name: str):
        attr = getattr(self._store, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            from sqlalchemy.exc import InterfaceError, OperationalError

            deadline, delay = time.monotonic() + self._patience_s, 0.25
            while True:
                try:
                    return attr(*args, **kwargs)
                except (OperationalError, InterfaceError) as e:
                    if time.monotonic() + delay > deadline:
                        raise
                    log.warning("job store unreachable in %s (%s); retrying in %.1f s", name, first_line(e), delay)
                    time.sleep(delay)
                    delay = min(2 * delay, 5.0)

        return call
