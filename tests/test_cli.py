"""The command line, run as a real process: check-config, serve, and demo.

Each test starts ``python -m gateway`` (and, where it is installed, the ``aai-gateway`` console
script) with a clean environment: no ``AAI_GATEWAY_*`` variable from the parent leaks in, and
``PYTHONPATH`` points at this checkout so the code under test is the code in this repository.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from gateway.__main__ import DEFAULT_SIM_PORT, _bind_sim, build_parser, masked
from gateway.config import load_config
from gateway.reload import config_hash

REPO = Path(__file__).parent.parent
SHIPPED = REPO / "config.yaml"
SECRET = "secret-key-123"

LAUNCHERS = [pytest.param([sys.executable, "-m", "gateway"], id="python-m-gateway")]
_SCRIPT = shutil.which("aai-gateway")
if _SCRIPT is not None:
    LAUNCHERS.append(pytest.param([_SCRIPT], id="console-script"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def clean_env(parent: Mapping[str, str] | None = None, **extra: str) -> dict[str, str]:
    """The parent's environment without any AAI_GATEWAY_* variable, plus ``extra``."""
    parent = os.environ if parent is None else parent
    env = {k: v for k, v in parent.items() if not k.startswith("AAI_GATEWAY_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def run(argv: Sequence[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(argv), cwd=REPO, env=env or clean_env(), capture_output=True, text=True, timeout=20
    )


@contextmanager
def started(argv: Sequence[str], log: Path, env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    """Start a long-running command with stdout+stderr in ``log``; always kill it at the end."""
    with log.open("wb") as out:
        proc = subprocess.Popen(list(argv), cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def http(
    method: str, url: str, *, body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, str]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers=dict(headers or {}))
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def wait_healthy(base: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"exited with {proc.returncode} before answering:\n{log.read_text()}")
        try:
            if http("GET", base + "/healthz")[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    pytest.fail(f"no 200 from {base}/healthz within {timeout} s:\n{log.read_text()}")


def stop(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> int:
    """SIGTERM, then the exit code; fails if the process outlives ``timeout``."""
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running {timeout} s after SIGTERM")


# --- check-config ------------------------------------------------------------------------------


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_check_config_accepts_the_shipped_file(launcher: list[str]) -> None:
    """check-config on the shipped file exits 0, says ok, and summarises the limits."""
    result = run([*launcher, "check-config", "config.yaml"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == "config.yaml: ok"
    assert "plan: paid" in result.stdout and "async 200 at once" in result.stdout
    assert result.stderr == ""
    hashed = config_hash(load_config("config.yaml", environ={}))
    assert f"config hash: {hashed}" in result.stdout  # what /readyz will show


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_check_config_rejects_a_bad_file(launcher: list[str], tmp_path: Path) -> None:
    """A bad file exits 1 and prints each error, with its key path, on stderr."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("limits: {llm_requests: {limit: 0}}\nnope: 1\n")
    result = run([*launcher, "check-config", str(bad)])
    assert result.returncode == 1
    assert f"{bad}: limits.llm_requests.limit: must be > 0" in result.stderr.splitlines()
    assert f"{bad}: nope: unknown key" in result.stderr.splitlines()
    assert "ok" not in result.stdout


def test_check_config_reads_the_path_from_the_environment(tmp_path: Path) -> None:
    """Without an argument, check-config validates $AAI_GATEWAY_CONFIG."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("listen: {port: 70000}\n")
    result = run([sys.executable, "-m", "gateway", "check-config"], clean_env(AAI_GATEWAY_CONFIG=str(bad)))
    assert result.returncode == 1
    assert f"{bad}: listen.port: must be <= 65535" in result.stderr


def test_check_config_names_the_variable_behind_a_bad_value() -> None:
    """A bad value from the environment is reported with the variable that set it."""
    result = run(
        [sys.executable, "-m", "gateway", "check-config", "config.yaml"], clean_env(AAI_GATEWAY_PORT="abc")
    )
    assert result.returncode == 1
    assert result.stderr.strip().startswith("config.yaml: listen.port: ")
    assert result.stderr.strip().endswith("(from $AAI_GATEWAY_PORT)")


def test_cli_runs_with_docstrings_stripped() -> None:
    """``python -OO`` (docstrings removed) must not break argument parsing."""
    result = run([sys.executable, "-OO", "-m", "gateway", "check-config", "config.yaml"])
    assert result.returncode == 0, result.stderr


# --- serve -------------------------------------------------------------------------------------


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_serve_refuses_a_bad_config(launcher: list[str], tmp_path: Path) -> None:
    """serve with a bad file exits 2 at once with the key path, and never listens."""
    port = free_port()
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"listen: {{port: {port}}}\nlimits: {{llm_requests: {{limit: 0}}}}\n")
    began = time.monotonic()
    result = run([*launcher, "serve", "--config", str(bad)])
    assert time.monotonic() - began < 10
    assert result.returncode == 2
    assert "invalid config" in result.stderr
    assert f"{bad}: limits.llm_requests.limit: must be > 0" in result.stderr
    assert "listening" not in result.stdout + result.stderr


def test_serve_starts_answers_and_stops_on_sigterm(tmp_path: Path) -> None:
    """Default config, port from $AAI_GATEWAY_PORT: healthy, embedded store, clean SIGTERM exit."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    env = clean_env(AAI_GATEWAY_PORT=str(port))
    with started([sys.executable, "-m", "gateway", "serve"], log, env) as proc:
        wait_healthy(base, proc, log)
        status, text = http("GET", base + "/readyz")
        assert status == 200
        assert json.loads(text)["store"] == "memory"
        assert stop(proc) == 0
    output = log.read_text()
    assert "store: embedded" in output
    assert f"listening on http://127.0.0.1:{port}" in output


def test_parent_environment_does_not_leak_into_the_gateway() -> None:
    """clean_env drops the parent's AAI_GATEWAY_* (here a bad Redis URL that would stop serve)."""
    env = clean_env({**os.environ, "AAI_GATEWAY_REDIS_URL": "http://not-redis", "AAI_GATEWAY_PORT": "1"})
    assert not any(k.startswith("AAI_GATEWAY_") for k in env)
    result = run([sys.executable, "-m", "gateway", "check-config"], env)
    assert result.returncode == 0, result.stderr
    assert "store: embedded" in result.stdout


# --- the upstream key never reaches logs or metrics --------------------------------------------


def test_demo_never_logs_the_key_or_the_query_string(tmp_path: Path) -> None:
    """In front of the simulator, requests carrying a key leave no trace of it anywhere."""
    port, sim_port = free_port(), free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "demo.log"
    argv = [sys.executable, "-m", "gateway", "demo", "--port", str(port), "--sim-port", str(sim_port)]
    key = {"Authorization": SECRET}
    with started(argv, log, clean_env()) as proc:
        wait_healthy(base, proc, log)
        status, _ = http(
            "POST",
            base + "/v2/transcript",
            body={"audio_url": "https://x/a.mp3?sim_seconds=0.1"},
            headers=key,
        )
        assert status == 200
        status, _ = http(
            "POST", base + "/v1/chat/completions", body={"model": "gpt-5", "messages": []}, headers=key
        )
        assert status == 200
        status, _ = http("GET", base + "/v3/token?expires_in_seconds=60&token=abc", headers=key)
        assert status == 200
        status, metrics = http("GET", base + "/metrics")
        assert status == 200
        stop(proc)
    output = log.read_text()
    assert 'aai_gateway_requests_total{group="token",outcome="ok"} 1.0' in metrics
    assert SECRET not in metrics
    assert SECRET not in output
    token_lines = [line for line in output.splitlines() if "/v3/token" in line]
    assert len(token_lines) == 1, output
    assert '"GET /v3/token" 200' in token_lines[0]
    assert "?" not in token_lines[0] and "token=abc" not in token_lines[0]
    assert "expires_in_seconds" not in token_lines[0]


def test_demo_refuses_a_bad_config_like_serve(tmp_path: Path) -> None:
    """demo with a bad file reports it like serve does: exit 2, 'invalid config', no traceback."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("nope: 1\n")
    argv = [sys.executable, "-m", "gateway", "demo", "--config", str(bad)]
    result = run([*argv, "--port", str(free_port()), "--sim-port", str(free_port())])
    assert result.returncode == 2
    assert "invalid config" in result.stderr and f"{bad}: nope: unknown key" in result.stderr
    assert "Traceback" not in result.stderr


# --- rough edges: SIGHUP, a taken port, warnings, --help ------------------------------------------


def test_sighup_reloads_the_config_and_keeps_serving(tmp_path: Path) -> None:
    """SIGHUP (a closed terminal, a reload by habit) re-reads the config (here: the defaults,
    so nothing changes) and leaves the gateway serving, with a log line naming the hash."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    env = clean_env(AAI_GATEWAY_PORT=str(port))
    with started([sys.executable, "-m", "gateway", "serve"], log, env) as proc:
        wait_healthy(base, proc, log)
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "(SIGHUP)" not in log.read_text() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert proc.poll() is None, f"exited with {proc.returncode}:\n{log.read_text()}"
        status, body = http("GET", base + "/readyz")
        assert status == 200
        running = json.loads(body)["config_hash"]
        assert stop(proc) == 0
    reloads = [line for line in log.read_text().splitlines() if "reloaded (SIGHUP)" in line]
    assert len(reloads) == 1 and f"hash {running} -> {running}; nothing changed" in reloads[0], reloads
    assert f"config {running})" in log.read_text()  # the start-up line names it too


@contextmanager
def taken_port() -> Iterator[int]:
    """A port another process (here: this one) is listening on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield int(s.getsockname()[1])


def assert_one_clean_line(result: subprocess.CompletedProcess[str], port: int, fix: str) -> None:
    assert result.returncode == 2, result
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    head = f"aai-gateway: cannot listen on 127.0.0.1:{port}: the address is already in use"
    assert lines[0].startswith(head)
    assert fix in lines[0]


def test_serve_reports_a_taken_port_in_one_line() -> None:
    """Port in use: one line naming the address and the fix, exit 2, no traceback, not 'listening'."""
    with taken_port() as port:
        result = run([sys.executable, "-m", "gateway", "serve"], clean_env(AAI_GATEWAY_PORT=str(port)))
    assert_one_clean_line(result, port, "listen.port")
    assert "Traceback" not in result.stderr and "listening" not in result.stderr


@pytest.mark.parametrize("option", ["--port", "--sim-port"])
def test_demo_reports_a_taken_port_in_one_line(option: str) -> None:
    """demo: the gateway's port or an explicitly chosen simulator port taken, the same clean line."""
    with taken_port() as port:
        other = "--sim-port" if option == "--port" else "--port"
        argv = [sys.executable, "-m", "gateway", "demo", option, str(port), other, str(free_port())]
        result = run(argv)
    assert_one_clean_line(result, port, f"choose another with {option}")
    assert "Traceback" not in result.stderr and "listening" not in result.stderr


def test_demo_simulator_moves_off_a_taken_default_port() -> None:
    """Without --sim-port, a taken 8099 (another demo) moves the simulator to a free port."""
    holder = socket.socket()
    try:
        holder.bind(("127.0.0.1", DEFAULT_SIM_PORT))
        holder.listen()
    except OSError:
        pass  # someone else holds it: just as good
    try:
        sock = _bind_sim(None)
        try:
            assert sock.getsockname()[1] != DEFAULT_SIM_PORT
        finally:
            sock.close()
    finally:
        holder.close()


def test_check_config_warns_when_the_wait_outlasts_the_sdk(tmp_path: Path) -> None:
    """A max wait above the SDK's 30 s timeout is valid (exit 0) but warned about."""
    path = tmp_path / "slow.yaml"
    path.write_text("queue: {max_wait_s: 40}\n")
    result = run([sys.executable, "-m", "gateway", "check-config", str(path)])
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == f"{path}: ok"
    assert result.stderr.startswith(f"{path}: warning: queue.max_wait_s is 40s: ")
    assert "30s" in result.stderr


def test_every_command_and_option_has_help() -> None:
    """--help describes every subcommand and every option."""
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helped = {choice.dest for choice in subparsers._choices_actions if choice.help}
    assert helped == set(subparsers.choices), helped
    for name, sub in subparsers.choices.items():
        for action in sub._actions:
            assert action.help, f"{name} {action.option_strings or action.dest}: no help"
    result = run([sys.executable, "-m", "gateway", "demo", "--help"])
    assert result.returncode == 0 and "--sim-port" in result.stdout and "free port" in result.stdout


# --- no key, token or control character in any log line ------------------------------------------


def raw_exchange(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        return data


def test_serve_logs_no_key_token_or_control_character(tmp_path: Path) -> None:
    """At DEBUG, malformed requests carrying a key, a path decoding to a forged line and a hit on
    the webhook receiver leave no key, no token and no raw control character in the log; the
    config's warning is logged at start."""
    port = free_port()
    config = tmp_path / "gw.yaml"
    config.write_text(f"listen: {{port: {port}}}\nlog: {{level: debug}}\nqueue: {{max_wait_s: 40}}\n")
    log = tmp_path / "serve.log"
    token = "0123456789abcdef0123456789abcdef"
    job = "5e3c1f2a-1b2c-8d4e-8f00-123456789abc"
    requests = [
        f"GET /v2/x%0aFORGED HTTP/1.1\r\nHost: x\r\nAuthorization: {SECRET}\r\nBad Header Line\r\n\r\n",
        f"GET /v2/x HTTP/1.1\r\nHost: x\r\nAuthorization: {SECRET}\x01\r\n\r\n",
        f"GE\x01T /v2/x HTTP/1.1\r\nAuthorization: {SECRET}\r\n\r\n",
        f"GET /v2/x%0d%0aFORGED?token={SECRET} HTTP/1.1\r\nHost: x\r\nAuthorization: {SECRET}\r\n\r\n",
        f"POST /_aai/webhook/{job}/{token} HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{{}}",
    ]
    argv = [sys.executable, "-m", "gateway", "serve", "--config", str(config)]
    with started(argv, log, clean_env()) as proc:
        wait_healthy(f"http://127.0.0.1:{port}", proc, log)
        for request in requests:
            assert raw_exchange(port, request.encode()).startswith(b"HTTP/1.")
        assert stop(proc) == 0
    output = log.read_text()
    assert "Error handling request" in output and "FORGED" in output and "/_aai/webhook/" in output
    assert SECRET not in output and token not in output
    assert f"/_aai/webhook/{job}/***" in output
    assert not any(c in output for c in "\x00\x01\r\x1b"), repr(output)
    for line in output.splitlines():
        if "FORGED" in line and not line.startswith(" "):
            assert "gateway.access" in line and '"GET /v2/x' in line, line
    assert "WARNING gateway: config: queue.max_wait_s is 40s" in output
    listening = [n for n, line in enumerate(output.splitlines()) if "listening on" in line]
    assert len(listening) == 1


# --- masking the Redis URL in log lines ----------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("redis://user:pw@host:6379/0", "redis://user:***@host:6379/0"),
        ("rediss://:pw@host:6380", "rediss://:***@host:6380"),
        pytest.param(
            "redis://host:6379/0?password=pw",
            "redis://host:6379/0?password=***",
        ),
    ],
)
def test_redis_url_is_masked(url: str, shown: str) -> None:
    """The start-up log and check-config show the Redis URL without its password."""
    assert masked(url) == shown
