"""The jobs this instance saw last: what it answers from while Redis is away.

Job records live in Redis. When it stops answering (``redis.on_outage: fail_open``), a
client polling a job must not get a 503 for it: the instance answers from the last record it
read or wrote for that job (a poll, a submission), kept here, at most ``RECENT_JOBS`` of them,
the least recently seen dropped first. The copy never holds the client's credential (a poll
brings its own key). It is read only while the store is unavailable; Redis stays the truth.

What such an answer is worth: a job seen running is refreshed from upstream as usual (its
real status and, once it completed, its real document); a job seen queued answers ``queued``
(a dispatcher may have submitted it since: the client learns it when Redis returns).
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Sequence

from .jobs import Job

RECENT_JOBS = 10_000


class RecentJobs:
    def __init__(self, capacity: int = RECENT_JOBS) -> None:
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._capacity = capacity

    def saw(self, job: Job) -> None:
        """``job`` as the store has it now (a copy is kept, without its credential)."""
        self._jobs[job.id] = dataclasses.replace(job, cred=None, extra=dict(job.extra))
        self._jobs.move_to_end(job.id)
        while len(self._jobs) > self._capacity:
            self._jobs.popitem(last=False)

    def get(self, job_id: str) -> Job | None:
        """The copy itself: a refresh from upstream while Redis is away updates it in place."""
        job = self._jobs.get(job_id)
        if job is not None:
            self._jobs.move_to_end(job_id)
        return job

    def by_upstream(self, upstream_ids: Sequence[str]) -> dict[str, str]:
        wanted = set(upstream_ids)
        return {job.upstream_id: job.id for job in self._jobs.values() if job.upstream_id in wanted}

    def forget(self, job_id: str) -> None:
        self._jobs.pop(job_id, None)

    def __len__(self) -> int:
        return len(self._jobs)
