"""``Config``: the whole file, its sections together, and the rules that span them (managed
mode and its projects, caps on projects and keys, the spend caps)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import (
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from .limits import Limits
from .prices import Pricing
from .sections import (
    Admin,
    Listen,
    Log,
    Project,
    Proxy,
    Queue,
    RedisSettings,
    Streaming,
    Transcripts,
    Upstream,
    _Model,
)

# Projects and keys each plan allows (the account page's table), for projects_limit and
# keys_limit written as a plan's name. Keys are counted across the account.
DIRECTORY_PRESETS: dict[str, tuple[int, int]] = {"free": (2, 2), "payg": (2, 4), "contracted": (5, 25)}


class Config(_Model):
    listen: Listen = Listen()
    upstream: Upstream = Upstream()
    redis: RedisSettings = RedisSettings()
    limits: Limits = Field(default_factory=lambda: Limits.model_validate({}))
    queue: Queue = Queue()
    proxy: Proxy = Proxy()
    transcripts: Transcripts = Transcripts()
    streaming: Streaming = Streaming()
    log: Log = Log()
    # The gateway's own address as clients reach it, e.g. https://aai-gw.example.com.
    public_url: str | None = None
    # One deployment serves one AssemblyAI account; its name tags every store key.
    account: str = "default"
    # SIGTERM: requests already admitted may finish within this; then the rest is ended.
    shutdown_grace_s: float = Field(20.0, gt=0)
    # Managed mode: clients send gateway keys, the account's key stays here
    # (upstream.api_key_env). Unset: managed when any project is listed, else pass-through
    # (clients send real keys). ``true`` with no projects: all of them made through the API.
    managed: bool = None  # type: ignore[assignment]  # filled in by _mode
    projects: tuple[Project, ...] = ()
    # Caps on projects and on keys (counted across the account), the file's and the API's
    # together: a number, a plan's name from the account page (free 2/2, payg 2/4,
    # contracted 5/25), or unset for no cap (the gateway's projects cost nothing upstream).
    projects_limit: Annotated[int, Field(ge=0)] | None = None
    keys_limit: Annotated[int, Field(ge=0)] | None = None
    admin: Admin = Admin()
    pricing: Pricing = Pricing()
    # The account's monthly spend cap (every project and key together), and, in pass-through
    # mode, each client key's own (by its fingerprint). None: no cap.
    spend_cap_usd: float | None = Field(None, ge=0)
    key_monthly_spend_cap_usd: float | None = Field(None, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _mode(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and data.get("managed") is None:
            data = {**data, "managed": bool(data.get("projects"))}
        return data

    @field_validator("projects_limit", "keys_limit", mode="before")
    @classmethod
    def _preset_cap(cls, v: Any, info: ValidationInfo) -> Any:
        if isinstance(v, str) and v in DIRECTORY_PRESETS:
            return DIRECTORY_PRESETS[v][0 if info.field_name == "projects_limit" else 1]
        return v

    @field_validator("projects", mode="before")
    @classmethod
    def _none_is_empty(cls, v: Any) -> Any:
        return () if v is None else v

    @model_validator(mode="after")
    def _unique_projects(self) -> Config:
        if self.projects and not self.managed:
            raise ValueError("managed: false, but projects are listed (projects need managed mode)")
        if isinstance(self.projects_limit, int) and len(self.projects) > self.projects_limit:
            listed = len(self.projects)
            raise ValueError(f"{listed} projects listed, over projects_limit ({self.projects_limit})")
        listed_keys = sum(len(p.keys) for p in self.projects)
        if isinstance(self.keys_limit, int) and listed_keys > self.keys_limit:
            raise ValueError(f"{listed_keys} keys listed, over keys_limit ({self.keys_limit})")
        names = [p.name for p in self.projects]
        if len(set(names)) != len(names):
            raise ValueError(f"project names must be unique: {names}")
        digests = [k.sha256 for p in self.projects for k in p.keys]
        if len(set(digests)) != len(digests):
            raise ValueError("the same key (sha256) is listed twice")
        return self

    @field_validator("public_url")
    @classmethod
    def _public(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return v.rstrip("/") if v else v

    def warnings(self) -> list[str]:
        """Values that are valid but probably not what the operator wants (logged at start)."""
        out = []
        sdk_timeout_s = 30.0  # the Python SDK's http_timeout
        for name, value in (("queue.max_wait_s", self.queue.max_wait_s),
                            ("queue.llm_max_wait_s", self.queue.llm_max_wait_s)):  # fmt: skip
            if value >= sdk_timeout_s:
                out.append(
                    f"{name} is {value:g}s: the AssemblyAI SDK gives up on a request after "
                    f"{sdk_timeout_s:g}s, so its clients time out before the gateway answers"
                )
        return out

    @field_validator("account")
    @classmethod
    def _account(cls, v: str) -> str:
        if not v or any(c in v for c in "{}: \n"):
            raise ValueError("must be non-empty, without braces, colons or spaces")
        return v
