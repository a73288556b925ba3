"""Who is calling: the one identity every product path uses for ownership, queue shares,
usage and logs, and the credential that goes upstream.

Two modes (``Config.managed``):

- **Pass-through** (no ``projects``): clients send real AssemblyAI keys. A key's owner is its
  fingerprint (``vault.fingerprint``, a keyed hash); upstream gets the key as sent.
- **Managed** (``projects`` listed): clients send gateway keys, each belonging to a project.
  The owner is the project (``project:<name>``: keys of one project share its data, as
  upstream's keys share a project's); upstream gets the account's key, from the environment,
  on every call (REST, LLM Gateway, tokens, WebSocket), put there by this module's middleware
  and never anywhere else. A missing, unknown or revoked key is a 401 in upstream's words,
  before anything is charged or sent. A streaming session may instead present a temporary
  token the gateway issued (``?token=``, or in ``Authorization`` as the Python SDK sends
  it): it belongs to the project that asked for it.

Keys are looked up by the SHA-256 of what the client sent (keys are random, 256 bits: a fast
hash is right) and the match is confirmed with a constant-time comparison. The gateway never
holds a client key in the clear beyond the request that carried it.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

from aiohttp import hdrs, web
from multidict import CIMultiDict

from .admission.health import keep_reading
from .config import Config
from .directory import REFRESH_EVERY_S, TOUCH_EVERY_S, Directory, Snapshot
from .errors import BadRequest, Unauthorized
from .logs import note_access
from .products.streaming_tokens import TokenBook
from .vault import Vault

log = logging.getLogger(__name__)

PRODUCT_PREFIXES = ("/v1/", "/v2/", "/v3/")


@dataclass(frozen=True, slots=True)
class Identity:
    owner: str  # owns jobs, uploads and tokens; takes a share of the queue; owns usage
    key: str  # names the key: its fingerprint (pass-through) or "<project>/<key name>"
    project: str | None = None  # managed mode: the project's name
    token: str | None = None  # a streaming session opened with a temporary token: the token


# The caller's identity (product paths only; None: no credential). Kept on the request.
IDENTITY: web.RequestKey[Identity | None] = web.RequestKey("identity", object)  # type: ignore[arg-type]


class KeyEntry(NamedTuple):
    project: str
    name: str
    sha256: str
    id: str = ""
    source: str = "config"  # "config" (the file) or "api" (the directory)
    created: float | None = None


KEY_PREFIX = "aaigw_"


def new_key() -> str:
    """A new gateway key: 256 random bits, with a prefix that says whose key it is (secret
    scanners and people can tell it from an AssemblyAI key)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def key_digest(secret: str) -> str:
    """The hex SHA-256 of a key as the config and the store keep it."""
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


def presented_key(header: str) -> str:
    """The key in an ``Authorization`` header, bare or ``Bearer <key>`` (both SDKs' ways)."""
    scheme, _, rest = header.strip().partition(" ")
    return rest.strip() if scheme.lower() == "bearer" and rest.strip() else header.strip()


def project_owner(project: str) -> str:
    return f"project:{project}"


def config_key_id(sha256: str) -> str:
    """A key from the config file's id (for the admin API's lists): stable, and not the
    key's hash itself."""
    return "cfg_" + hashlib.sha256(b"aai-gateway key id\0" + sha256.encode()).hexdigest()[:16]


class KeyRing:
    """The gateway keys that may call (managed mode): the config file's, and the directory's
    (made through the admin API; gateway/directory.py), re-read whenever its version moves.

    Each instance notes when its keys were used and writes that down every
    ``TOUCH_EVERY_S``; the admin API's lists read it."""

    def __init__(
        self, cfg: Config, directory: Directory | None = None, *, wall: Callable[[], float] = time.time
    ) -> None:
        self.directory = directory
        self._wall = wall
        self._file: dict[str, KeyEntry] = {}
        self._runtime: dict[str, KeyEntry] = {}
        self.file_projects: tuple[str, ...] = ()
        self.runtime_projects: dict[str, float] = {}  # name -> created
        self.runtime_caps: dict[str, float] = {}  # name -> monthly spend cap (USD), where set
        self.version = -1  # the directory's version this ring reflects (-1: not read yet)
        self._used: dict[str, float] = {}  # key id -> last use not yet written down
        self.use_config(cfg)

    def use_config(self, cfg: Config) -> None:
        """A reload: keys added to or removed from the file apply to the next request."""
        self.file_projects = tuple(project.name for project in cfg.projects)
        self._file = {
            key.sha256: KeyEntry(project.name, key.name, key.sha256, config_key_id(key.sha256))
            for project in cfg.projects
            for key in project.keys
        }

    def use_snapshot(self, snap: Snapshot) -> None:
        self.runtime_projects = {p.name: p.created for p in snap.projects}
        self.runtime_caps = {p.name: p.spend_cap for p in snap.projects if p.spend_cap is not None}
        self._runtime = {
            k.sha256: KeyEntry(k.project, k.name, k.sha256, k.id, "api", k.created) for k in snap.keys
        }
        self.version = snap.version

    def projects(self) -> list[str]:
        return sorted({*self.file_projects, *self.runtime_projects})

    def keys(self, project: str | None = None) -> list[KeyEntry]:
        entries = [*self._file.values(), *self._runtime.values()]
        return [e for e in entries if project is None or e.project == project]

    def find(self, secret: str) -> KeyEntry | None:
        digest = key_digest(secret)
        entry = self._file.get(digest) or self._runtime.get(digest)
        if entry is None or not hmac.compare_digest(entry.sha256, digest):
            return None
        if entry.source == "api" and entry.project not in self.runtime_projects:
            if entry.project not in self.file_projects:  # its project left the config file
                return None
        self._used[entry.id] = self._wall()
        return entry

    def pending_use(self) -> dict[str, float]:
        return dict(self._used)

    async def refresh(self) -> bool:
        """Re-read the directory if it changed. True when the ring changed."""
        if self.directory is None or await self.directory.version() == self.version:
            return False
        self.use_snapshot(await self.directory.snapshot())
        return True

    async def write_use(self) -> None:
        used, self._used = self._used, {}
        if self.directory is not None and used:
            try:
                await self.directory.touch(used)
            except BaseException:
                for key_id, at in used.items():  # kept for the next round
                    self._used[key_id] = max(at, self._used.get(key_id, 0.0))
                raise

    async def run(self) -> None:
        """Keep the ring up to date (every REFRESH_EVERY_S) and write down the keys' use
        (every TOUCH_EVERY_S). While the store is away, the last view stays in force."""
        last_touch = time.monotonic()

        async def once() -> None:
            nonlocal last_touch
            await self.refresh()
            if time.monotonic() - last_touch >= TOUCH_EVERY_S:
                last_touch = time.monotonic()
                await self.write_use()

        await keep_reading("keys", once, REFRESH_EVERY_S)


class Auth:
    """Decides who a request is (``identify``) and what goes upstream in its name."""

    def __init__(
        self,
        cfg: Config,
        vault: Vault,
        tokens: TokenBook,
        *,
        upstream_key: str | None = None,
        directory: Directory | None = None,
    ) -> None:
        """``upstream_key``: the account's key (managed mode; required there). ``directory``:
        projects and keys made through the admin API (managed mode)."""
        if cfg.managed and not upstream_key:
            raise ValueError(
                f"managed mode (projects are configured) needs the account key in ${cfg.upstream.api_key_env}"
            )
        self.managed = cfg.managed
        self.ring = KeyRing(cfg, directory if cfg.managed else None)
        self._vault = vault
        self._tokens = tokens
        self._upstream_key = upstream_key or ""

    def use_config(self, cfg: Config) -> None:
        self.ring.use_config(cfg)

    @property
    def upstream_key(self) -> str:
        """The account's key (managed mode), for the gateway's own calls (a queued job's POST,
        a refresh). Never logged, never stored."""
        return self._upstream_key

    async def identify(self, request: web.Request) -> tuple[Identity | None, str | None]:
        """(who is calling, the ``Authorization`` to send upstream instead of the client's,
        or None to send it as it came). ``(None, None)``: no credential at all (a public
        route, or a streaming session with ``?token=`` in pass-through mode).
        Raises Unauthorized (managed mode) for a key that is not a gateway key."""
        values = request.headers.getall(hdrs.AUTHORIZATION, [])
        if len(values) > 1:  # which one counts would be anyone's guess (a logger's, upstream's)
            raise BadRequest("Send one Authorization header")
        header = values[0] if values else None
        if header is not None and not _fit(header):  # no key has them: never sent on, never stored
            raise Unauthorized()
        queried = request.query.getall("token", []) if _is_session(request) else []
        if len(queried) > 1 or (queried and header is not None and presented_key(header) != queried[0]):
            # Two credentials that disagree: the session would be billed to one and use the other.
            raise BadRequest("Send the token in Authorization or in ?token=, not both")
        if not self.managed:
            if header:
                fingerprint = self._vault.fingerprint(header)
                return Identity(owner=fingerprint, key=fingerprint[:16]), None
            return None, None
        if header is not None:  # present, even empty: it must be a gateway key
            entry = self.ring.find(presented_key(header))
            if entry is not None:
                who = Identity(project_owner(entry.project), f"{entry.project}/{entry.name}", entry.project)
                return who, self._upstream_key
            if _is_session(request):  # the Python SDK sends a temporary token here
                identity = await self._token_identity(presented_key(header))
                if identity is not None:
                    return identity, None  # the token goes upstream as it came
            raise Unauthorized()
        token = request.query.get("token") if _is_session(request) else None
        if token:
            identity = await self._token_identity(token)
            if identity is not None:
                return identity, None
            raise Unauthorized()
        return None, None

    async def _token_identity(self, token: str) -> Identity | None:
        """A temporary token the gateway issued, still valid: its project's identity."""
        note = await self._tokens.lookup(self._vault.fingerprint(token))
        if note is None or not note.owner.startswith("project:") or note.valid_until <= time.time():
            return None
        project = note.owner.removeprefix("project:")
        return Identity(owner=note.owner, key=f"{project}/token", project=project, token=token)


def _fit(header: str) -> bool:
    """Printable ASCII (and tabs): what every key and token is made of."""
    return header.isascii() and header.replace("\t", " ").isprintable()


def _is_session(request: web.Request) -> bool:
    return request.path == "/v3/ws"


def identity_of(request: web.Request) -> Identity | None:
    """The caller's identity (set by the middleware on product paths), or None."""
    return request.get(IDENTITY)


def owner_of(request: web.Request) -> str:
    """The caller's owner id; "" when the request carried no credential."""
    identity = identity_of(request)
    return identity.owner if identity is not None else ""


def identity_middleware(auth: Auth) -> Callable[..., Awaitable[web.StreamResponse]]:
    """Product paths only (/v1, /v2, /v3): who the caller is, set on the request; in managed
    mode the client's key is replaced by the account's before any handler sees the request,
    so nothing downstream can forward the client's key or forget to add the account's.
    Innermost: the errors middleware answers its 401 and counts it like any other."""

    @web.middleware
    async def middleware(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if not request.path.startswith(PRODUCT_PREFIXES):
            return await handler(request)
        identity, upstream_auth = await auth.identify(request)
        request[IDENTITY] = identity
        if identity is not None:
            note_access(request, key=identity.key)
            if identity.project is not None:
                note_access(request, project=identity.project)
        if upstream_auth is not None:
            request = request.clone(headers=_with_authorization(request.headers, upstream_auth))
        return await handler(request)

    return middleware


def _with_authorization(headers: Mapping[str, str], value: str) -> CIMultiDict[str]:
    out = CIMultiDict(headers)
    out.popall(hdrs.AUTHORIZATION, None)
    out[hdrs.AUTHORIZATION] = value
    return out
