"""The admin API: projects and gateway keys at runtime (managed mode).

    POST   /admin/v1/projects                {"name": "ci"}  -> 201 the project
    GET    /admin/v1/projects                                -> 200 {"projects": [...]}
    PATCH  /admin/v1/projects/{project}      {"monthly_spend_cap_usd": 50}  -> 200 the project
    DELETE /admin/v1/projects/{project}                      -> 200 the project, its keys revoked
    POST   /admin/v1/projects/{project}/keys {"name": "ci"}  -> 201 {"id", "name", "project", "key", ...}
    GET    /admin/v1/projects/{project}/keys                 -> 200 {"keys": [...]} (never a key)
    DELETE /admin/v1/keys/{id}                               -> 200 the key, revoked

Every route takes ``Authorization: Bearer $AAI_GATEWAY_ADMIN_TOKEN`` (``require_admin``: 401
without it, 403 with a wrong one) and does not exist (404) when no admin token is set. A new
key is shown once, in the 201; the directory keeps its SHA-256 only. Projects and keys from
the config file are listed (``"source": "config"``) but changed only by editing the file
(409). A deleted project's name is not given again (409): its transcripts keep their owner.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from aiohttp import hdrs, web

from .config import Config, ProjectKey
from .directory import Directory, Refused
from .errors import BadRequest, Conflict, Forbidden, NotFound, Unauthorized
from .identity import KeyEntry, KeyRing, key_digest, new_key

log = logging.getLogger("gateway")

ADMIN_TOKEN_ENV = "AAI_GATEWAY_ADMIN_TOKEN"
MAX_BODY = 4096
_PROJECT = re.compile(r"[a-z0-9-]{1,63}")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def require_admin(token: str) -> Callable[[web.Request], None]:
    """A check for admin routes: ``Authorization: Bearer <token>``, compared in constant time
    (SHA-256 digests, so not even the length leaks). No token configured: NotFound (the
    admin surface nobody enabled does not exist); no bearer: Unauthorized; wrong: Forbidden."""
    digest = hashlib.sha256(token.encode()).digest() if token else None

    def check(request: web.Request) -> None:
        if digest is None:
            raise NotFound()
        scheme, _, given = request.headers.get(hdrs.AUTHORIZATION, "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise Unauthorized(
                f"Admin token missing: send Authorization: Bearer <${ADMIN_TOKEN_ENV}>",
                headers={"WWW-Authenticate": 'Bearer realm="aai-gateway admin"'},
            )
        if not hmac.compare_digest(hashlib.sha256(given.strip().encode()).digest(), digest):
            raise Forbidden("Admin token invalid")

    return check


def _when(t: float | None) -> str | None:
    return None if t is None else datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds")


class AdminApi:
    """The routes above, over one KeyRing (what this instance serves) and its directory."""

    def __init__(self, ring: KeyRing, directory: Directory, config: Callable[[], Config], token: str) -> None:
        self._ring = ring
        self._dir = directory
        self._config = config  # the running config (it changes on a reload)
        self._check = require_admin(token)

    def routes(self) -> list[tuple[str, str, Handler]]:
        """(method, path, handler) for each route."""
        guarded = self._guarded
        return [
            ("POST", "/admin/v1/projects", guarded(self.create_project)),
            ("GET", "/admin/v1/projects", guarded(self.list_projects)),
            ("DELETE", "/admin/v1/projects/{project}", guarded(self.delete_project)),
            ("PATCH", "/admin/v1/projects/{project}", guarded(self.update_project)),
            ("POST", "/admin/v1/projects/{project}/keys", guarded(self.create_key)),
            ("GET", "/admin/v1/projects/{project}/keys", guarded(self.list_keys)),
            ("DELETE", "/admin/v1/keys/{id}", guarded(self.delete_key)),
        ]

    def _guarded(self, handle: Handler) -> Handler:
        async def guarded(request: web.Request) -> web.StreamResponse:
            self._check(request)
            if not self._config().managed:
                raise NotFound(
                    "Projects and gateway keys exist in managed mode only (see `managed` in the config)"
                )
            return await handle(request)

        return guarded

    # -- projects --------------------------------------------------------------------------
    async def create_project(self, request: web.Request) -> web.Response:
        body = await _body(request)
        name = _field(body, "name")
        spend_cap = _spend_cap(body)
        if not _PROJECT.fullmatch(name):
            raise BadRequest("name: must be lowercase letters, digits and '-' ([a-z0-9-]+, at most 63)")
        cfg = self._config()
        if name in self._ring.file_projects:
            raise Conflict(f"Project {name!r} exists (in the config file)")
        cap = None if cfg.projects_limit is None else cfg.projects_limit - len(cfg.projects)
        try:
            rec = await self._dir.add_project(name, cap=cap, spend_cap=spend_cap)
        except Refused as exc:
            raise _refusal(
                exc, f"Project {name!r}", cap_name="projects_limit", cap=cfg.projects_limit
            ) from None
        await self._ring.refresh()
        log.info("admin: project %s created", name)
        doc = {"name": name, "source": "api", "created": _when(rec.created), "keys": 0,
               "monthly_spend_cap_usd": spend_cap}  # fmt: skip
        return web.json_response(doc, status=201)

    async def update_project(self, request: web.Request) -> web.Response:
        """Change a runtime project's monthly spend cap (``null``: none); every instance
        applies it within the directory's refresh."""
        name = request.match_info["project"]
        body = await _body(request)
        if "monthly_spend_cap_usd" not in body:
            raise BadRequest("monthly_spend_cap_usd: required (a number of USD, or null for no cap)")
        if name in self._ring.file_projects:
            raise Conflict(f"Project {name!r} is in the config file: set its cap there and reload")
        spend_cap = _spend_cap(body)
        if not await self._dir.set_spend_cap(name, spend_cap):
            raise NotFound(f"Project {name!r} not found")
        await self._ring.refresh()
        log.info("admin: project %s spend cap set to %s", name, spend_cap)
        return web.json_response({"name": name, "source": "api", "monthly_spend_cap_usd": spend_cap})

    async def list_projects(self, request: web.Request) -> web.Response:
        await self._ring.refresh()
        out = []
        file_caps = {p.name: p.monthly_spend_cap_usd for p in self._config().projects}
        for name in self._ring.projects():
            created = self._ring.runtime_projects.get(name)
            source = "config" if name in self._ring.file_projects else "api"
            cap = file_caps[name] if source == "config" else self._ring.runtime_caps.get(name)
            out.append(
                {
                    "name": name,
                    "source": source,
                    "created": _when(created),
                    "keys": len(self._ring.keys(name)),
                    "monthly_spend_cap_usd": cap,
                }
            )
        return web.json_response({"projects": out})

    async def delete_project(self, request: web.Request) -> web.Response:
        name = request.match_info["project"]
        if name in self._ring.file_projects:
            raise Conflict(f"Project {name!r} is in the config file: remove it there and reload")
        gone = await self._dir.delete_project(name)
        if gone is None:
            raise NotFound(f"Project {name!r} not found")
        await self._ring.refresh()
        log.info("admin: project %s deleted; %d keys revoked", name, len(gone))
        return web.json_response({"name": name, "deleted": True, "keys_revoked": [k.id for k in gone]})

    # -- keys ------------------------------------------------------------------------------
    async def create_key(self, request: web.Request) -> web.Response:
        project = self._project(request)
        name = _field(await _body(request), "name")
        try:
            ProjectKey(name=name, sha256="0" * 64)  # the file's rules for a key's name
        except ValueError:
            raise BadRequest("name: 1 to 100 printable characters, without '|' or '/'") from None
        if any(k.name == name for k in self._ring.keys(project)):
            raise Conflict(f"Key {name!r} exists in project {project!r}")
        cfg = self._config()
        listed = sum(len(p.keys) for p in cfg.projects)
        cap = None if cfg.keys_limit is None else cfg.keys_limit - listed
        secret = new_key()
        try:
            rec = await self._dir.add_key(
                project, name, key_digest(secret), cap=cap, known=project in self._ring.file_projects
            )
        except Refused as exc:
            raise _refusal(
                exc, f"Key {name!r} in project {project!r}", cap_name="keys_limit", cap=cfg.keys_limit
            ) from None
        await self._ring.refresh()
        log.info("admin: key %s (%s/%s) created", rec.id, project, name)
        doc = {"id": rec.id, "name": name, "project": project, "key": secret, "created": _when(rec.created)}
        return web.json_response(doc, status=201)

    async def list_keys(self, request: web.Request) -> web.Response:
        project = self._project(request)
        await self._ring.refresh()
        entries = self._ring.keys(project)
        stored = await self._dir.last_used(e.id for e in entries)
        mine = self._ring.pending_use()
        out = []
        for entry in entries:
            used = max(stored.get(entry.id, 0.0), mine.get(entry.id, 0.0)) or None
            out.append(_key_doc(entry) | {"last_used": _when(used)})
        return web.json_response({"keys": out})

    async def delete_key(self, request: web.Request) -> web.Response:
        key_id = request.match_info["id"]
        if any(e.id == key_id and e.source == "config" for e in self._ring.keys()):
            raise Conflict(f"Key {key_id} is in the config file: remove it there and reload")
        rec = await self._dir.delete_key(key_id)
        if rec is None:
            raise NotFound(f"Key {key_id} not found")
        await self._ring.refresh()
        log.info("admin: key %s (%s/%s) revoked", rec.id, rec.project, rec.name)
        return web.json_response({"id": rec.id, "name": rec.name, "project": rec.project, "revoked": True})

    def _project(self, request: web.Request) -> str:
        name = request.match_info["project"]
        if name not in self._ring.file_projects and name not in self._ring.runtime_projects:
            raise NotFound(f"Project {name!r} not found")
        return name


def _key_doc(entry: KeyEntry) -> dict[str, Any]:
    return {"id": entry.id, "name": entry.name, "project": entry.project, "source": entry.source,
            "created": _when(entry.created)}  # fmt: skip


def _refusal(exc: Refused, what: str, *, cap_name: str, cap: int | None) -> Exception:
    if exc.reason == Refused.CAP:
        return Forbidden(f"{cap_name} ({cap}) reached: delete one first, or raise {cap_name} in the config")
    if exc.reason == Refused.REUSED:
        return Conflict(f"{what}: the name belonged to a deleted project and is not given again")
    if exc.reason == Refused.NO_PROJECT:
        return NotFound(f"{what}: project not found")
    return Conflict(f"{what} exists")


async def _body(request: web.Request) -> dict[str, Any]:
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise BadRequest(f"Body over {MAX_BODY} bytes")
    raw = await request.content.read(MAX_BODY + 1)
    if len(raw) > MAX_BODY:
        raise BadRequest(f"Body over {MAX_BODY} bytes")
    try:
        doc = json.loads(raw or b"{}")
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise BadRequest("Body must be a JSON object") from None
    if not isinstance(doc, dict):
        raise BadRequest("Body must be a JSON object")
    return doc


def _spend_cap(doc: dict[str, Any]) -> float | None:
    value = doc.get("monthly_spend_cap_usd")
    if value is None:
        return None
    if type(value) not in (int, float) or not 0 <= value < 1e12:
        raise BadRequest("monthly_spend_cap_usd: a number of USD, 0 or more, or null")
    return float(value)


def _field(doc: dict[str, Any], name: str) -> str:
    value = doc.get(name)
    if not isinstance(value, str) or not value:
        raise BadRequest(f"{name}: required, a non-empty string")
    return value
