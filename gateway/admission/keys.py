"""Every store key, built in one place.

All keys of one account share one hash tag, ``{account}``, so every multi-key script runs
unchanged on Redis Cluster (one account lives on one shard; Cluster spreads accounts).
``prefix`` sits outside the tag so tests can isolate themselves without FLUSHALL.

The owners' shares of the queue live in three keys per account rather than one per owner:
release and refresh know only a ticket, and a script may touch only keys named before it
runs, so the ticket's owner is looked up (share:owner) inside the script.

    <prefix>:{<account>}:leases:<limit>   sorted set: lease/reservation -> expiry (ms, store time)
    <prefix>:{<account>}:wait:<limit>     sorted set: ticket -> (99 - priority) * 10^12 + arrival seq
    <prefix>:{<account>}:dead:<limit>     sorted set: ticket -> deadline (ms, store time)
    <prefix>:{<account>}:resv:<limit>     sorted set: reservation holder -> its ordering score
    <prefix>:{<account>}:seq              arrival counter
    <prefix>:{<account>}:tomb:<ticket>    tombstone of an aborted ticket (short TTL)
    <prefix>:{<account>}:ended:<ticket>   a released lease's ticket (short TTL): renew never restores it
    <prefix>:{<account>}:share:dead       sorted set: waiting ticket with an owner -> deadline (ms)
    <prefix>:{<account>}:share:owner      hash: waiting ticket with an owner -> owner id
    <prefix>:{<account>}:share:lex        sorted set, every score 0: owner id, a tab, ticket (counted
                                          per owner with ZLEXCOUNT: the owner's waiting tickets)
    <prefix>:{<account>}:wake             pub/sub channel: wake-up messages (store.py)
    <prefix>:{<account>}:job:<id>         hash: a transcript job (products/transcripts/jobs.py)
    <prefix>:{<account>}:jobs:queued      sorted set: queued job ids -> (priority, arrival)
    <prefix>:{<account>}:jobs:running     sorted set: claimed/submitted job ids -> last heard (ms)
    <prefix>:{<account>}:upid:<id>        string: upstream transcript id -> job id
    <prefix>:{<account>}:idem:<key>       string: idempotency key (creator + header) -> job id
    <prefix>:{<account>}:ledger:<day>     hash: project|key|product|model|customer|metric -> amount
    <prefix>:{<account>}:ledger-seen:<h>  string: a usage event counted (its id's hash; TTL: ledger.py)
    <prefix>:{<account>}:ledger-cust:<day>:<h>  set: a project's (or key's) customers that day
    <prefix>:{<account>}:spend:<month>    hash: project (or key), and "*" -> USD spent that month
    <prefix>:{<account>}:holds            hash: project (or key), and "*" -> USD held for work in flight
    <prefix>:{<account>}:dir:*            runtime projects and keys (directory.py)
    <prefix>:{<account>}:upload:<sha256>  string: the project that made an upload (products/uploads.py)
    <prefix>:{<account>}:stoken:<fp>      string: a temporary streaming token's expiry and owner
    <prefix>:{<account>}:instances        sorted set: gateway instance -> last heartbeat (ms; fallback.py)
    <prefix>:{<account>}:tick             string: Redis time of the last heartbeat (ms; fence.py)
    <prefix>:{<account>}:fence            string, short TTL: while it lives, acquire admits nothing
                                          (the outage fence, fallback.py)
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

# An owner id (who a waiting ticket belongs to: a key fingerprint, later a project) goes into
# Redis members and the ``share:lex`` ranges: a plain token is kept, anything else is hashed.
_PLAIN_OWNER = re.compile(r"[0-9A-Za-z_.:-]{1,128}")


def _check_part(what: str, value: str) -> str:
    if not value or any(c in value for c in "{}\r\n "):
        raise ValueError(f"{what} {value!r} must be non-empty and contain no braces, spaces or newlines")
    return value


def owner_id(owner: str) -> str:
    """``owner`` as stored: itself when it is a plain token (a hex fingerprint is), else
    ``~`` and a hash of it (``~`` is not in a plain token, so the two kinds never collide).
    Never contains a tab, the separator in ``share:lex`` members."""
    if _PLAIN_OWNER.fullmatch(owner):
        return owner
    return "~" + hashlib.blake2b(owner.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


@dataclass(frozen=True, slots=True)
class Keys:
    prefix: str = "aai"
    account: str = "default"

    def __post_init__(self) -> None:
        _check_part("key prefix", self.prefix)
        _check_part("account", self.account)

    @property
    def base(self) -> str:
        return f"{self.prefix}:{{{self.account}}}"

    @property
    def instances(self) -> str:
        return f"{self.base}:instances"

    def leases(self, limit: str) -> str:
        return f"{self.base}:leases:{limit}"

    def wait(self, limit: str) -> str:
        return f"{self.base}:wait:{limit}"

    def dead(self, limit: str) -> str:
        return f"{self.base}:dead:{limit}"

    def resv(self, limit: str) -> str:
        return f"{self.base}:resv:{limit}"

    @property
    def tick(self) -> str:
        return f"{self.base}:tick"

    @property
    def fence(self) -> str:
        return f"{self.base}:fence"

    @property
    def seq(self) -> str:
        return f"{self.base}:seq"

    def tomb(self, ticket: str) -> str:
        return f"{self.base}:tomb:{ticket}"

    def ended(self, ticket: str) -> str:
        return f"{self.base}:ended:{ticket}"

    @property
    def share_dead(self) -> str:
        return f"{self.base}:share:dead"

    @property
    def share_owner(self) -> str:
        return f"{self.base}:share:owner"

    @property
    def share_lex(self) -> str:
        return f"{self.base}:share:lex"

    @property
    def channel(self) -> str:
        return f"{self.base}:wake"

    def job(self, job_id: str) -> str:
        return f"{self.base}:job:{job_id}"

    @property
    def jobs_queued(self) -> str:
        return f"{self.base}:jobs:queued"

    @property
    def jobs_running(self) -> str:
        return f"{self.base}:jobs:running"

    def upstream_id(self, upstream_id: str) -> str:
        return f"{self.base}:upid:{upstream_id}"

    def idempotency(self, key: str) -> str:
        return f"{self.base}:idem:{key}"

    def ledger(self, day: str) -> str:
        return f"{self.base}:ledger:{day}"

    def ledger_seen(self, digest: str) -> str:
        return f"{self.base}:ledger-seen:{digest}"

    def ledger_customers(self, day: str, who: str) -> str:
        digest = hashlib.sha256(who.encode("utf-8", "surrogateescape")).hexdigest()[:16]
        return f"{self.base}:ledger-cust:{day}:{digest}"

    def spend(self, month: str) -> str:
        return f"{self.base}:spend:{month}"

    @property
    def holds(self) -> str:
        return f"{self.base}:holds"

    def upload(self, digest: str) -> str:
        return f"{self.base}:upload:{digest}"

    def directory(self, part: str) -> str:
        """Projects and keys made at runtime (gateway/directory.py)."""
        return f"{self.base}:dir:{part}"

    def streaming_token(self, fingerprint: str) -> str:
        return f"{self.base}:stoken:{fingerprint}"
