"""Loading: YAML read (or the built-in defaults), environment overrides applied, validated,
and every error named by its key path: ``config.yaml: limits.llm_requests.limit: must be > 0``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import (
    ValidationError,
)

from .limits import _merge
from .model import Config

# Environment variables that override deployment values, and the key each one sets.
ENV_OVERRIDES: dict[str, tuple[str, ...]] = {
    "AAI_GATEWAY_HOST": ("listen", "host"),
    "AAI_GATEWAY_PORT": ("listen", "port"),
    "AAI_GATEWAY_REDIS_URL": ("redis", "url"),
    "AAI_GATEWAY_PUBLIC_URL": ("public_url",),
    "AAI_GATEWAY_PLAN": ("limits", "plan"),
    "AAI_GATEWAY_ACCOUNT": ("account",),
    "AAI_GATEWAY_API_URL": ("upstream", "api_url"),
    "AAI_GATEWAY_LLM_URL": ("upstream", "llm_url"),
    "AAI_GATEWAY_STREAMING_URL": ("upstream", "streaming_url"),
    "AAI_GATEWAY_LOG_LEVEL": ("log", "level"),
    "AAI_GATEWAY_LOG_FORMAT": ("log", "format"),
}


class ConfigError(ValueError):
    """The config cannot be used; the message names the file, the key path and the reason."""


def _describe(err: Mapping[str, Any]) -> str:
    kind, ctx = err["type"], err.get("ctx") or {}
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required"
    for bound, op in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
        if bound in ctx and kind.endswith(
            ("greater_than", "greater_than_equal", "less_than", "less_than_equal")
        ):
            value = ctx[bound]
            return f"must be {op} {value:g}" if isinstance(value, float) else f"must be {op} {value}"
    if kind == "value_error":
        return str(ctx.get("error", err["msg"]))
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected')}"
    msg = str(err["msg"])
    return msg[:1].lower() + msg[1:]


def _format(source: str, exc: ValidationError, environ: Mapping[str, str]) -> str:
    from_env = {".".join(path): var for var, path in ENV_OVERRIDES.items() if environ.get(var)}
    lines = []
    for err in exc.errors():
        path = ".".join(str(p) for p in err["loc"] if p != "function-after")
        origin = f" (from ${from_env[path]})" if path in from_env else ""
        lines.append(f"{source}: {path}: {_describe(err)}{origin}")
    return "\n".join(lines)


def apply_env(raw: dict[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    out = _merge({}, raw)
    for var, path in ENV_OVERRIDES.items():
        value = environ.get(var)
        if value is None or value == "":
            continue
        node = out
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = {}
            if not isinstance(child, Mapping):
                break  # a bad section stays as it is, for validation to report it
            node[part] = dict(child)
            node = node[part]
        else:
            node[path[-1]] = value
    return out


def load_config(
    path: str | os.PathLike[str] | None = None, *, environ: Mapping[str, str] | None = None
) -> Config:
    """Read, override from the environment, and validate. Raises ``ConfigError``."""
    environ = os.environ if environ is None else environ
    source = str(path) if path is not None else "<defaults>"
    raw: Any = {}
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"{source}: cannot read: {exc.strerror}") from exc
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{source}: not valid YAML: {exc}") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: the top level must be a mapping of keys")
    raw = apply_env(raw, environ)
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format(source, exc, environ)) from None
