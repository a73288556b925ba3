"""Jobs in Redis, shared by every instance: a hash per job, two indexes, one script per
conditional verb (lua/*.lua, each opening with its contract). Keys carry the account's hash
tag (admission/keys.py), so the scripts run unchanged on Redis Cluster.

Failures are translated to StoreUnavailable here, as the admission store does.

The client retries a call once on a connection error (admission/redis_store.py make_client),
which replays a script whose reply was lost after it ran: every script here is idempotent
for the same arguments (a claim names its claimer uniquely, an end carries a token), so a
replay returns what the first run did and changes nothing.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Sequence
from importlib import resources
from typing import Any

import redis.asyncio as aioredis
from redis import exceptions as redis_errors

from ...admission.keys import Keys
from ...errors import StoreUnavailable
from .jobs import MAX_ERROR_CHARS, Job, ended_extra, extra_fields, queue_score


def _script(name: str) -> str:
    return resources.files("gateway.products.transcripts").joinpath("lua", f"{name}.lua").read_text()


def _flat(fields: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for k, v in fields.items():
        out += [k, str(v)]
    return out


def _decode(raw: Sequence[Any]) -> dict[str, str]:
    items = [x.decode() if isinstance(x, bytes) else str(x) for x in raw]
    return dict(zip(items[0::2], items[1::2], strict=True))


class RedisJobStore:
    kind = "redis"

    def __init__(
        self,
        client: aioredis.Redis,
        keys: Keys,
        *,
        shebang: bool = True,
        wall: Callable[[], float] = time.time,
        on_call: Callable[[str], None] | None = None,
    ) -> None:
        self._r = client
        self._k = keys
        self._wall = wall
        self._on_call = on_call
        self._floor = 0  # the highest arrival sequence seen: no new job takes one at or below it
        head = "#!lua\n" if shebang else ""
        self._create = client.register_script(head + _script("create"))
        self._claim = client.register_script(head + _script("claim"))
        self._requeue = client.register_script(head + _script("requeue"))
        self._update = client.register_script(head + _script("update"))
        self._end = client.register_script(head + _script("end"))
        self._heard = client.register_script(head + _script("heard"))
        self._purge = client.register_script(head + _script("purge"))

    def _now(self) -> int:
        return int(self._wall() * 1000)

    async def _call(self, op: str, awaitable: Any) -> Any:
        if self._on_call is not None:
            self._on_call(op)
        try:
            return await awaitable
        except (TimeoutError, OSError, redis_errors.RedisError) as exc:
            raise StoreUnavailable(f"redis failed during job {op}: {type(exc).__name__}: {exc}") from exc

    # -- verbs -------------------------------------------------------------------------
    async def create(self, job: Job, *, idempotency: str | None = None, idem_ttl_s: int = 86400) -> Job:
        k = self._k
        idem_key = k.idempotency(idempotency) if idempotency else k.job(job.id)
        ttl = idem_ttl_s * 1000 if idempotency else 0
        keys = [k.job(job.id), k.jobs_queued, idem_key, k.seq]

        def args() -> list[Any]:
            score = queue_score(job.priority, job.created_ms)
            return [job.id, score, ttl, self._floor, *_flat(job.to_fields())]

        existing, seq = await self._call("create", self._create(keys=keys, args=args()))
        if existing:
            found = await self.get(existing.decode() if isinstance(existing, bytes) else str(existing))
            if found is not None:
                return found
            # The key names a job since deleted (upstream refused it at once): a new one.
            await self._call("create", self._r.delete(idem_key))
            existing, seq = await self._call("create", self._create(keys=keys, args=args()))
            if existing:  # recreated meanwhile by a concurrent retry
                found = await self.get(existing.decode() if isinstance(existing, bytes) else str(existing))
                if found is not None:
                    return found
        job.seq = int(seq)
        self._floor = max(self._floor, job.seq)
        return job

    def _seen(self, job: Job) -> Job:
        self._floor = max(self._floor, job.seq)
        return job

    async def get(self, job_id: str) -> Job | None:
        raw = await self._call("get", self._r.hgetall(self._k.job(job_id)))
        if not raw:
            return None
        return self._seen(Job.from_fields({kk.decode(): v.decode() for kk, v in raw.items()}))

    async def by_upstream(self, upstream_ids: Sequence[str]) -> dict[str, str]:
        if not upstream_ids:
            return {}
        found = await self._call("lookup", self._r.mget([self._k.upstream_id(u) for u in upstream_ids]))
        return {u: j.decode() for u, j in zip(upstream_ids, found, strict=True) if j is not None}

    async def _set(
        self, job_id: str, fields: dict[str, Any], *, heard: bool = False, index: str = ""
    ) -> bool:
        k = self._k
        keys = [k.job(job_id), k.jobs_running, k.upstream_id(index) if index else k.job(job_id)]
        args = [job_id, str(self._now()) if heard else "", "1" if index else "0", *_flat(fields)]
        return bool(await self._call("update", self._update(keys=keys, args=args)))

    async def set_seq(self, job_id: str, seq: int) -> None:
        await self._set(job_id, {"seq": seq})

    async def claim(self, job_id: str, claimer: str, claim_ms: int) -> Job | None:
        k = self._k
        keys = [k.job(job_id), k.jobs_queued, k.jobs_running]
        raw = await self._call("claim", self._claim(keys=keys, args=[job_id, claimer, claim_ms, self._now()]))
        return self._seen(Job.from_fields(_decode(raw))) if raw else None

    async def submitted(self, job_id: str, upstream_id: str, snapshot: dict[str, Any]) -> None:
        fields = {"state": "submitted", "upstream_id": upstream_id, "snapshot": json.dumps(snapshot)}
        fields["body"] = "{}"  # upstream has it now; nothing needs it again
        fields["refreshed_ms"] = str(self._now())
        await self._set(job_id, fields, heard=True, index=upstream_id)

    async def requeue(self, job_id: str, *, attempt: int, claimer: str = "") -> bool:
        job = await self.get(job_id)
        if job is None:
            return False
        k = self._k
        keys = [k.job(job_id), k.jobs_queued, k.jobs_running]
        args: list[Any] = [job_id, attempt, queue_score(job.priority, job.created_ms), claimer]
        return bool(await self._call("requeue", self._requeue(keys=keys, args=args)))

    async def refreshed(self, job_id: str, snapshot: dict[str, Any]) -> None:
        await self._set(job_id, {"snapshot": json.dumps(snapshot), "refreshed_ms": self._now()}, heard=True)

    async def end(
        self,
        job_id: str,
        *,
        snapshot: dict[str, Any] | None,
        error: str,
        retention_s: int,
        upstream_id: str = "",
    ) -> Job | None:
        job = await self.get(job_id)
        if job is None:
            return None
        k = self._k
        now = self._now()
        fields: dict[str, Any] = {"ended_ms": now, "error": error[:MAX_ERROR_CHARS], "body": "{}"}
        fields.update(extra_fields(ended_extra(job.extra)))
        if snapshot is not None:
            fields.update(snapshot=json.dumps(snapshot), refreshed_ms=now)
        new_index = bool(upstream_id and not job.upstream_id)
        if new_index:
            fields["upstream_id"] = upstream_id
        known = job.upstream_id or upstream_id
        index = k.upstream_id(known) if known else k.job(job_id)
        keys = [k.job(job_id), k.jobs_queued, k.jobs_running, index, k.job(job_id) + ":end"]
        token = uuid.uuid4().hex
        args: list[Any] = [job_id, retention_s * 1000, int(new_index), token, *_flat(fields)]
        raw = await self._call("end", self._end(keys=keys, args=args))
        return Job.from_fields(_decode(raw)) if raw else None

    async def update_extra(self, job_id: str, extra: dict[str, Any]) -> None:
        await self._set(job_id, extra_fields(extra))

    async def delete(self, job_id: str) -> None:
        k = self._k
        pipe = self._r.pipeline(transaction=True)
        pipe.delete(k.job(job_id))
        pipe.zrem(k.jobs_queued, job_id)
        pipe.zrem(k.jobs_running, job_id)
        await self._call("delete", pipe.execute())

    async def purge(self, job_id: str) -> None:
        job = await self.get(job_id)
        if job is None or job.state.value != "ended":
            return
        snapshot = json.dumps({"id": job.upstream_id or job.id, "status": job.status})
        args = [snapshot, *(f"x:{name}" for name in job.extra)]
        await self._call("purge", self._purge(keys=[self._k.job(job_id)], args=args))

    async def queued(self, limit: int) -> list[str]:
        ids = await self._call("queued", self._r.zrange(self._k.jobs_queued, 0, limit - 1))
        return [i.decode() for i in ids]

    async def running(self, heard_before_ms: int, limit: int) -> list[str]:
        ids = await self._call(
            "running",
            self._r.zrangebyscore(self._k.jobs_running, "-inf", f"({heard_before_ms}", start=0, num=limit),
        )
        return [i.decode() for i in ids]

    async def heard(self, job_id: str, *, before_ms: int, now_ms: int) -> bool:
        keys = [self._k.jobs_running]
        return bool(await self._call("heard", self._heard(keys=keys, args=[job_id, before_ms, now_ms])))

    async def counts(self) -> dict[str, int]:
        queued = await self._call("counts", self._r.zcard(self._k.jobs_queued))
        running = await self._call("counts", self._r.zcard(self._k.jobs_running))
        return {"queued": int(queued), "running": int(running)}

    async def close(self) -> None:
        return None

    def __repr__(self) -> str:
        return f"RedisJobStore({self._k.base})"
