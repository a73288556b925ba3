"""Configuration: a typed, frozen model, plan presets, environment overrides, exact errors.

``load_config(path)`` reads YAML (or uses the built-in defaults, identical to the shipped
config.yaml), applies environment overrides, fills limits left unset from the plan's preset
(the account page: free 5 / paid 200 transcripts at once, 5 / 100 new streaming sessions a
minute, LLM Gateway 30 a minute per model on paid only, 20,000 requests per 5 minutes), and
validates everything. A bad file stops the gateway with the key's path and the reason::

    config.yaml: limits.llm_requests.limit: must be > 0

The parts: sections.py (each section's model), limits.py (the account's limits and the plan
presets), prices.py (the shipped price table), model.py (``Config``: the sections together),
loading.py (YAML, environment overrides, errors by key path). Everything is imported from
here: ``from gateway.config import Config, load_config``.
"""

from __future__ import annotations

from .limits import PRESETS, ROUTE_GROUPS, Limits, LlmRequests, ModelWindow, Requests, Window
from .loading import ENV_OVERRIDES, ConfigError, apply_env, load_config
from .model import DIRECTORY_PRESETS, Config
from .prices import PRICES_STREAMING, PRICES_TAKEN, PRICES_TRANSCRIPTION, Pricing, TokenPrice
from .sections import (
    Admin,
    Listen,
    Log,
    Project,
    ProjectKey,
    Proxy,
    Queue,
    RedisSettings,
    Sentinel,
    Streaming,
    Tls,
    Transcripts,
    Upstream,
)

__all__ = [
    "DIRECTORY_PRESETS",
    "ENV_OVERRIDES",
    "PRESETS",
    "PRICES_STREAMING",
    "PRICES_TAKEN",
    "PRICES_TRANSCRIPTION",
    "ROUTE_GROUPS",
    "Admin",
    "Config",
    "ConfigError",
    "Limits",
    "Listen",
    "LlmRequests",
    "Log",
    "ModelWindow",
    "Pricing",
    "Project",
    "ProjectKey",
    "Proxy",
    "Queue",
    "RedisSettings",
    "Requests",
    "Sentinel",
    "Streaming",
    "TokenPrice",
    "Tls",
    "Transcripts",
    "Upstream",
    "Window",
    "apply_env",
    "load_config",
]
