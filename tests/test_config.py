"""Configuration: the shipped file, plan presets, environment overrides, exact error messages,
and the limits the catalog builds from a config.

Every test passes ``environ=`` explicitly so the real process environment never leaks in.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gateway.admission.limits import (
    RANK_CONCURRENCY,
    RANK_MODEL,
    RANK_WINDOW,
    OrderError,
    check_classes,
    concurrency_limit,
    window_limit,
)
from gateway.config import Config, ConfigError, Limits, load_config
from gateway.products.catalog import Catalog

REPO = Path(__file__).parent.parent
SHIPPED = REPO / "config.yaml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def load_text(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> Config:
    return load_config(write(tmp_path, text), environ=environ or {})


def error_of(path: Path | str | None, environ: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, environ=environ or {})
    return str(info.value)


def limits(raw: dict[str, Any]) -> Limits:
    return Config.model_validate({"limits": raw}).limits


# --- the shipped file --------------------------------------------------------------------------


def test_shipped_config_equals_builtin_defaults() -> None:
    """config.yaml spells out the defaults: loading it gives exactly the built-in config."""
    assert load_config(SHIPPED, environ={}) == load_config(None, environ={})


def test_builtin_defaults_are_the_documented_ones() -> None:
    """Spot-check the defaults the README's table promises."""
    cfg = load_config(None, environ={})
    assert (cfg.listen.host, cfg.listen.port) == ("127.0.0.1", 8080)
    assert cfg.upstream.api_url == "https://api.assemblyai.com"
    assert cfg.upstream.llm_url == "https://llm-gateway.assemblyai.com"
    assert cfg.upstream.streaming_url == "wss://streaming.assemblyai.com"
    assert cfg.redis.url is None
    assert (cfg.queue.max_wait_s, cfg.queue.llm_max_wait_s, cfg.queue.max_depth) == (25, 10, 10_000)
    assert cfg.limits.requests.route_groups == ("rest", "llm", "token")
    assert cfg.limits.requests.count_reads is True
    assert cfg.account == "default" and cfg.public_url is None


def test_empty_file_gives_the_defaults(tmp_path: Path) -> None:
    """An empty file is a file with every key left out."""
    assert load_text(tmp_path, "") == load_config(None, environ={})


# --- plan presets ------------------------------------------------------------------------------


def test_paid_preset_is_the_default() -> None:
    """Without a plan the account is paid: 200 at once, 100 sessions/min, LLM 30/min, 20k/5 min."""
    lim = load_config(None, environ={}).limits
    assert lim.plan == "paid"
    assert lim.async_concurrency == 200
    assert (lim.streaming_sessions.limit, lim.streaming_sessions.window_s) == (100, 60)
    assert (lim.llm_requests.limit, lim.llm_requests.window_s) == (30, 60)
    assert (lim.requests.limit, lim.requests.window_s) == (20_000, 300)
    assert lim.llm_available is True


def test_free_preset(tmp_path: Path) -> None:
    """plan: free gives 5 transcripts at once, 5 new sessions a minute, and no LLM Gateway."""
    lim = load_text(tmp_path, "limits: {plan: free}\n").limits
    assert lim.async_concurrency == 5
    assert (lim.streaming_sessions.limit, lim.streaming_sessions.window_s) == (5, 60)
    assert (lim.requests.limit, lim.requests.window_s) == (20_000, 300)
    assert lim.llm_available is False


def test_file_value_overrides_the_preset(tmp_path: Path) -> None:
    """A value written in the file wins over the plan's; the rest of the preset still applies."""
    lim = load_text(tmp_path, "limits: {plan: free, async_concurrency: 7}\n").limits
    assert lim.async_concurrency == 7
    assert lim.streaming_sessions.limit == 5


def test_nested_override_keeps_the_rest_of_the_preset(tmp_path: Path) -> None:
    """A per-model override merges into the preset: the default limit and window are kept."""
    text = "limits:\n  plan: paid\n  llm_requests: {models: {gpt-5: {limit: 60}}}\n"
    llm = load_text(tmp_path, text).limits.llm_requests
    assert (llm.limit, llm.window_s) == (30, 60)
    assert llm.models["gpt-5"].limit == 60
    assert llm.models["gpt-5"].window_s is None  # falls back to llm_requests.window_s


def test_partial_window_override_keeps_the_preset_window(tmp_path: Path) -> None:
    """streaming_sessions: {limit: 500} raises the limit and keeps the preset's 60 s window."""
    ss = load_text(tmp_path, "limits: {streaming_sessions: {limit: 500}}\n").limits.streaming_sessions
    assert (ss.limit, ss.window_s) == (500, 60)


def test_null_limit_means_use_the_preset(tmp_path: Path) -> None:
    """A limit left empty (YAML null), as an uncommented line would be, takes the preset."""
    lim = load_text(tmp_path, "limits:\n  plan: free\n  async_concurrency:\n").limits
    assert lim.async_concurrency == 5


def test_plan_from_the_environment_picks_the_preset() -> None:
    """AAI_GATEWAY_PLAN is applied before the presets are filled in."""
    lim = load_config(None, environ={"AAI_GATEWAY_PLAN": "free"}).limits
    assert lim.plan == "free" and lim.async_concurrency == 5 and lim.llm_available is False


# --- environment overrides ---------------------------------------------------------------------

FILE_WITH_DEPLOYMENT_VALUES = """\
listen: {host: 127.0.0.1, port: 9000}
redis: {url: "redis://file:6379/0"}
limits: {plan: paid}
public_url: https://file.example.com
account: file-account
upstream: {api_url: "https://file-api.example.com"}
"""


@pytest.mark.parametrize(
    ("var", "value", "read"),
    [
        ("AAI_GATEWAY_PORT", "9100", lambda c: c.listen.port),
        ("AAI_GATEWAY_HOST", "0.0.0.0", lambda c: c.listen.host),
        ("AAI_GATEWAY_REDIS_URL", "redis://env:6379/1", lambda c: c.redis.url),
        ("AAI_GATEWAY_PLAN", "free", lambda c: c.limits.plan),
        ("AAI_GATEWAY_PUBLIC_URL", "https://env.example.com", lambda c: c.public_url),
        ("AAI_GATEWAY_ACCOUNT", "env-account", lambda c: c.account),
        ("AAI_GATEWAY_API_URL", "https://env-api.example.com", lambda c: c.upstream.api_url),
    ],
)
def test_environment_overrides_the_file(tmp_path: Path, var: str, value: str, read: Any) -> None:
    """Each deployment variable wins over the file's value (converted to the key's type)."""
    base = load_text(tmp_path, FILE_WITH_DEPLOYMENT_VALUES)
    cfg = load_config(tmp_path / "config.yaml", environ={var: value})
    expected = int(value) if var == "AAI_GATEWAY_PORT" else value
    assert read(cfg) == expected
    assert read(base) != expected


@pytest.mark.parametrize(
    "var",
    [
        "AAI_GATEWAY_PORT",
        "AAI_GATEWAY_HOST",
        "AAI_GATEWAY_REDIS_URL",
        "AAI_GATEWAY_PLAN",
        "AAI_GATEWAY_PUBLIC_URL",
    ],
)
def test_empty_environment_value_is_ignored(tmp_path: Path, var: str) -> None:
    """An empty variable (e.g. ``AAI_GATEWAY_PORT=``) leaves the file's value in force."""
    assert load_text(tmp_path, FILE_WITH_DEPLOYMENT_VALUES, {var: ""}) == load_text(
        tmp_path, FILE_WITH_DEPLOYMENT_VALUES
    )


def test_environment_overrides_without_a_file() -> None:
    """Overrides also apply on top of the built-in defaults."""
    cfg = load_config(None, environ={"AAI_GATEWAY_PORT": "8181", "AAI_GATEWAY_REDIS_URL": "redis://r:6379/2"})
    assert cfg.listen.port == 8181 and cfg.redis.url == "redis://r:6379/2"


def test_unrelated_environment_is_ignored() -> None:
    """Only the documented variables are read; others (even AAI_GATEWAY_*-looking) are not."""
    env = {"AAI_GATEWAY_LISTEN_PORT": "1", "PORT": "2", "REDIS_URL": "redis://x"}
    assert load_config(None, environ=env) == load_config(None, environ={})


# --- golden bad configs: the exact message -----------------------------------------------------

GOLDEN = [
    pytest.param("nope: 1\n", "nope: unknown key", id="unknown-top-level-key"),
    pytest.param(
        "limits: {llm_requests: {foo: 1}}\n", "limits.llm_requests.foo: unknown key", id="unknown-nested-key"
    ),
    pytest.param(
        "limits: {llm_requests: {limit: 0}}\n", "limits.llm_requests.limit: must be > 0", id="llm-limit-zero"
    ),
    pytest.param("listen: {port: 70000}\n", "listen.port: must be <= 65535", id="port-too-big"),
    pytest.param("listen: {port: -1}\n", "listen.port: must be >= 0", id="port-negative"),
    pytest.param(
        'listen: {port: "x"}\n',
        "listen.port: input should be a valid integer, unable to parse string as an integer",
        id="port-not-a-number",
    ),
    pytest.param(
        "redis: {url: 'http://x'}\n",
        "redis.url: must start with redis://, rediss:// or unix://",
        id="redis-bad-scheme",
    ),
    pytest.param(
        "upstream: {api_url: 'ftp://x'}\n",
        "upstream.api_url: must start with http:// or https://",
        id="api-url-bad-scheme",
    ),
    pytest.param(
        "upstream: {streaming_url: 'https://x'}\n",
        "upstream.streaming_url: must start with ws:// or wss://",
        id="streaming-url-bad-scheme",
    ),
    pytest.param(
        "limits: {requests: {route_groups: [rest, nope]}}\n",
        "limits.requests.route_groups: unknown route group 'nope' (known: rest, llm, token, streaming)",
        id="unknown-route-group",
    ),
    pytest.param("queue: {max_wait_s: -1}\n", "queue.max_wait_s: must be > 0", id="negative-max-wait"),
    pytest.param(
        "account: 'a{b}'\n",
        "account: must be non-empty, without braces, colons or spaces",
        id="account-with-braces",
    ),
    pytest.param(
        "limits: {llm_requests: {models: {gpt-5: {limit: 0}}}}\n",
        "limits.llm_requests.models.gpt-5.limit: must be > 0",
        id="model-limit-zero",
    ),
    pytest.param(
        "log: {level: verbose}\n",
        "log.level: must be one of 'debug', 'info', 'warning' or 'error'",
        id="bad-log-level",
    ),
    pytest.param(
        "limits: {plan: gold}\n",
        "limits.plan: must be one of 'free' or 'paid'",
        id="unknown-plan",
    ),
]


@pytest.mark.parametrize(("text", "message"), GOLDEN)
def test_golden_bad_config(tmp_path: Path, text: str, message: str) -> None:
    """A bad file stops with exactly one line: ``<file>: <key path>: <reason>``."""
    path = write(tmp_path, text)
    assert error_of(path) == f"{path}: {message}"


def test_yaml_syntax_error(tmp_path: Path) -> None:
    """Broken YAML names the file and says so, with the parser's position."""
    path = write(tmp_path, "listen: {port: 1\n")
    message = error_of(path)
    assert message.startswith(f"{path}: not valid YAML")
    assert "line" in message


@pytest.mark.parametrize("text", ["- a\n- b\n", "42\n", "just a string\n"])
def test_top_level_must_be_a_mapping(tmp_path: Path, text: str) -> None:
    """A list or a scalar at the top level is refused before validation."""
    path = write(tmp_path, text)
    assert error_of(path) == f"{path}: the top level must be a mapping of keys"


def test_missing_file(tmp_path: Path) -> None:
    """A file that cannot be read names the path and the OS's reason."""
    path = tmp_path / "absent.yaml"
    message = error_of(path)
    assert message.startswith(f"{path}: cannot read: ")
    assert "No such file" in message


def test_bad_value_from_the_environment_says_so(tmp_path: Path) -> None:
    """A bad value that came from a variable names the variable, not just the key."""
    path = write(tmp_path, "listen: {port: 9000}\n")
    message = error_of(path, {"AAI_GATEWAY_PORT": "abc"})
    assert message == (
        f"{path}: listen.port: input should be a valid integer, unable to parse string as an integer"
        " (from $AAI_GATEWAY_PORT)"
    )
    assert message.endswith("(from $AAI_GATEWAY_PORT)")


def test_bad_value_from_the_environment_without_a_file() -> None:
    """Without a file the source is ``<defaults>``, and the variable is still named."""
    message = error_of(None, {"AAI_GATEWAY_REDIS_URL": "http://x"})
    assert message == (
        "<defaults>: redis.url: must start with redis://, rediss:// or unix:// (from $AAI_GATEWAY_REDIS_URL)"
    )


def test_file_error_is_not_blamed_on_an_unrelated_variable(tmp_path: Path) -> None:
    """Only the key a variable set gets the ``(from $VAR)`` note."""
    path = write(tmp_path, "listen: {port: 70000}\n")
    assert error_of(path, {"AAI_GATEWAY_HOST": "0.0.0.0"}) == f"{path}: listen.port: must be <= 65535"


def test_empty_environment_value_does_not_mask_a_file_error(tmp_path: Path) -> None:
    """An empty variable is ignored for the error too: the file's value is reported, unattributed."""
    path = write(tmp_path, "listen: {port: 70000}\n")
    assert error_of(path, {"AAI_GATEWAY_PORT": ""}) == f"{path}: listen.port: must be <= 65535"


def test_every_error_is_reported_one_per_line(tmp_path: Path) -> None:
    """Several mistakes in one file are all reported, each on its own line."""
    path = write(
        tmp_path,
        "nope: 1\nlisten: {port: 70000}\nqueue: {max_wait_s: 0}\nlimits: {llm_requests: {limit: 0}}\n",
    )
    lines = error_of(path).splitlines()
    assert sorted(lines) == sorted(
        [
            f"{path}: nope: unknown key",
            f"{path}: listen.port: must be <= 65535",
            f"{path}: queue.max_wait_s: must be > 0",
            f"{path}: limits.llm_requests.limit: must be > 0",
        ]
    )


def test_environment_override_does_not_hide_a_bad_section(tmp_path: Path) -> None:
    """``listen: 5`` is wrong whether or not AAI_GATEWAY_PORT also sets listen.port."""
    path = write(tmp_path, "listen: 5\n")
    with pytest.raises(ConfigError, match=r"listen"):
        load_config(path, environ={"AAI_GATEWAY_PORT": "9000"})


# --- the catalog built from a config ------------------------------------------------------------


def test_catalog_limit_names_and_capacities() -> None:
    """The default config builds the five kinds of limit, named as the store keys expect."""
    catalog = Catalog(load_config(None, environ={}).limits)
    assert catalog.requests.name == "requests" and catalog.requests.capacity == 20_000
    assert catalog.requests.window_ms == 300_000
    assert catalog.model("gpt-5").name == "llm:gpt-5" and catalog.model("gpt-5").capacity == 30
    assert catalog.understanding.name == "llm-understanding" and catalog.understanding.capacity == 30
    assert catalog.streaming_sessions.name == "streaming" and catalog.streaming_sessions.capacity == 100
    assert catalog.async_jobs.name == "async" and catalog.async_jobs.capacity == 200


def test_catalog_follows_the_plan() -> None:
    """On the free plan the catalog's limits carry the free preset's capacities."""
    catalog = Catalog(limits({"plan": "free"}))
    assert catalog.async_jobs.capacity == 5
    assert catalog.streaming_sessions.capacity == 5


def test_configured_model_gets_its_own_capacity_and_label() -> None:
    """A model in llm_requests.models has its own capacity, window and metric label."""
    catalog = Catalog(limits({"llm_requests": {"models": {"my-model": {"limit": 7, "window_s": 10}}}}))
    mine = catalog.model("my-model")
    assert mine.name == "llm:my-model" and mine.metric_label == "llm:my-model"
    assert mine.capacity == 7 and mine.window_ms == 10_000


def test_configured_model_without_window_uses_the_default_window() -> None:
    """A model override with only a limit keeps llm_requests.window_s."""
    catalog = Catalog(limits({"llm_requests": {"models": {"gpt-5": {"limit": 60}}}}))
    gpt5 = catalog.model("gpt-5")
    assert gpt5.capacity == 60 and gpt5.window_ms == 60_000


def test_model_labels_are_bounded() -> None:
    """Known models are labelled by name; any other model shares ``llm:other`` (keyed by name)."""
    catalog = Catalog(load_config(None, environ={}).limits)
    assert catalog.model("gpt-5").metric_label == "llm:gpt-5"
    unknown = catalog.model("some-unknown-model")
    assert unknown.metric_label == "llm:other"
    assert unknown.name == "llm:some-unknown-model" and unknown.capacity == 30


def test_guard_ms_per_limit_override() -> None:
    """limits.guard_ms is added to every window lease unless the limit sets its own."""
    catalog = Catalog(limits({"guard_ms": 50, "requests": {"guard_ms": 0}}))
    assert catalog.requests.lease_ms == catalog.requests.window_ms
    assert catalog.streaming_sessions.lease_ms == catalog.streaming_sessions.window_ms + 50


@pytest.mark.parametrize(
    ("requests", "group", "method", "counts"),
    [
        ({}, "rest", "GET", True),
        ({}, "rest", "POST", True),
        ({}, "streaming", "GET", False),  # not in the default route_groups
        ({"count_reads": False}, "rest", "GET", False),
        ({"count_reads": False}, "rest", "HEAD", False),
        ({"count_reads": False}, "rest", "POST", True),
        ({"count_reads": True}, "rest", "GET", True),
        ({"route_groups": ["llm", "token"]}, "rest", "POST", False),
        ({"route_groups": ["llm", "token"]}, "llm", "POST", True),
    ],
)
def test_account_window(requests: dict[str, Any], group: str, method: str, counts: bool) -> None:
    """Which route groups and methods take a token from the account window is configurable."""
    catalog = Catalog(limits({"requests": requests}))
    assert catalog.account_window(group, method) == ([catalog.requests] if counts else [])


# --- the order check ------------------------------------------------------------------------------


def test_check_classes_refuses_classes_that_share_a_limit_but_not_its_tail() -> None:
    """Two classes sharing limit A must share every limit after A, or deadlock becomes possible."""
    a = window_limit("a", 10, 60, 0, rank=RANK_MODEL)
    b = concurrency_limit("b", 5, 3600, rank=RANK_CONCURRENCY)
    requests = window_limit("requests", 100, 300, 0, rank=RANK_WINDOW)
    with pytest.raises(OrderError, match="'a'"):
        check_classes([[a, b, requests], [a, requests]])


def test_check_classes_accepts_consistent_classes() -> None:
    """Classes that meet only at the end (the account window) are fine, in any listing order."""
    a = window_limit("a", 10, 60, 0, rank=RANK_MODEL)
    b = concurrency_limit("b", 5, 3600, rank=RANK_CONCURRENCY)
    requests = window_limit("requests", 100, 300, 0, rank=RANK_WINDOW)
    check_classes([[requests, a], [b, requests], [requests]])


@pytest.mark.parametrize(
    "raw",
    [{}, {"plan": "free"}, {"llm_requests": {"models": {"gpt-5": {"limit": 60}, "x": {"limit": 1}}}}],
)
def test_catalog_classes_pass_the_order_check(raw: dict[str, Any]) -> None:
    """Every request class the catalog builds passes the check it runs at start."""
    check_classes(Catalog(limits(raw)).classes())


def test_a_cluster_url_naming_another_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("redis: {url: 'redis://10.0.0.5:6379/3', cluster: true}\n")
    with pytest.raises(ConfigError, match=r"redis: a Redis Cluster has only database 0"):
        load_config(path, environ={})
    path.write_text("redis: {url: 'redis://10.0.0.5:6379/0', cluster: true}\n")
    assert load_config(path, environ={}).redis.sharded  # sharded pub/sub: on with cluster
