"""deploy/kubernetes, deploy/grafana/aai-gateway.json and deploy/prometheus/alerts.yml, checked.

The manifests are validated against one pinned Kubernetes version's schemas
(``kubernetes-validate``, strict: a misspelt field fails); the Deployment is held to what the
gateway needs (probes, a termination grace above ``shutdown_grace_s``, its one writable
directory, secrets by reference). The dashboard's and the alerts' queries may name only
metrics the gateway exports: a gateway is built, given a little traffic and scraped, and the
names are checked against what it serves and the families it declares. ``promtool check
rules`` checks the alerts. A missing tool fails under CI (``CI=true``) and skips elsewhere.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from gateway.config import Config
from tests.helpers import stack

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
K8S = DEPLOY / "kubernetes"
DASHBOARD = DEPLOY / "grafana" / "aai-gateway.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
# The Kubernetes version the manifests are validated against (kubernetes-validate ships its
# schemas); raise it with the oldest version the deployment must support.
K8S_VERSION = "1.33.0"
SECRET_VARS = {
    "AAI_GATEWAY_SECRET_KEY": "secret-key",
    "AAI_GATEWAY_UPSTREAM_KEY": "upstream-key",
    "AAI_GATEWAY_ADMIN_TOKEN": "admin-token",
}


def _missing(what: str, how: str) -> None:
    """CI must run every check: a missing tool fails there, and only skips on a laptop."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{what} is missing and CI=true: {how}")
    pytest.skip(f"{what} is not installed")


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _kustomized() -> dict[str, dict[str, Any]]:
    """The manifests kustomization.yaml applies, by kind."""
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    out: dict[str, dict[str, Any]] = {}
    for name in kust["resources"]:
        for doc in _docs(K8S / name):
            assert doc["kind"] not in out, f"{name}: a second {doc['kind']}"
            out[doc["kind"]] = doc
    return out


def _container(deployment: dict[str, Any]) -> dict[str, Any]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def _config_in_configmap() -> Config:
    """The ConfigMap's config.yaml, validated as the gateway validates its file."""
    return Config.model_validate(yaml.safe_load(_kustomized()["ConfigMap"]["data"]["config.yaml"]))


# -- Kubernetes ----------------------------------------------------------------------------


def test_every_manifest_is_valid_for_the_pinned_kubernetes() -> None:
    try:
        import kubernetes_validate
    except ImportError:
        _missing("kubernetes-validate", "pip install -e '.[test]' (or pip install kubernetes-validate)")
    files = sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    assert {p.name for p in files} >= {
        "configmap.yaml", "deployment.yaml", "service.yaml", "hpa.yaml", "hpa-queue-depth.yaml",
        "pdb.yaml", "secret.example.yaml",
    }  # fmt: skip
    for path in files:
        for doc in _docs(path):
            try:
                kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{path.name}: {doc['kind']}: {exc.message} at {list(exc.path)}")


def test_kustomization_applies_everything_but_the_example_secret_and_the_optional_hpa() -> None:
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kust["kind"] == "Kustomization"
    resources = kust["resources"]
    assert all((K8S / name).is_file() for name in resources)
    assert "secret.example.yaml" not in resources  # a real secret never comes from the repo
    assert "hpa-queue-depth.yaml" not in resources  # it needs a custom metrics adapter
    kinds = _kustomized()
    assert set(kinds) == {
        "ConfigMap", "Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget",
    }  # fmt: skip
    assert "Secret" not in kinds


def test_the_deployment_gives_the_gateway_what_it_needs() -> None:
    kinds = _kustomized()
    dep = kinds["Deployment"]
    pod = dep["spec"]["template"]["spec"]
    container = _container(dep)
    config = _config_in_configmap()

    assert dep["spec"]["replicas"] == 3 == kinds["HorizontalPodAutoscaler"]["spec"]["minReplicas"]
    assert container["image"] == "aai-gateway:latest"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert {"requests", "limits"} <= set(container["resources"])
    for part in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(container["resources"][part])

    # The kubelet's SIGKILL must come after the preStop pause, the gateway's whole grace and
    # its ~2 s to exit (README: Shutdown and rolling restarts).
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] > pre_stop + config.shutdown_grace_s + 2

    keys = {c["topologyKey"] for c in pod["topologySpreadConstraints"]}
    assert keys == {"kubernetes.io/hostname", "topology.kubernetes.io/zone"}

    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    # Its one writable directory is an emptyDir (the root filesystem is read-only).
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts[config.transcripts.data_dir]]

    # The config file mounted is the one $AAI_GATEWAY_CONFIG names.
    env = {e["name"]: e for e in container["env"]}
    config_path = Path(env["AAI_GATEWAY_CONFIG"]["value"])
    assert (
        volumes[mounts[str(config_path.parent)]]["configMap"]["name"]
        == kinds["ConfigMap"]["metadata"]["name"]
    )

    # Secrets by reference only, from the Secret secret.example.yaml describes.
    (example,) = _docs(K8S / "secret.example.yaml")
    for var, key in SECRET_VARS.items():
        assert "value" not in env[var], f"{var} inlined"
        ref = env[var]["valueFrom"]["secretKeyRef"]
        assert (ref["name"], ref["key"]) == (example["metadata"]["name"], key)
        assert example["stringData"][key].startswith("REPLACE")  # a placeholder, never a real one
    assert env["AAI_GATEWAY_SECRET_KEY"]["valueFrom"]["secretKeyRef"].get("optional") is not True


def test_the_configmap_is_a_valid_config_for_several_replicas() -> None:
    config = _config_in_configmap()
    assert config.redis.url is not None and config.redis.url.startswith("redis://redis:")
    assert config.listen.host == "0.0.0.0"
    assert config.transcripts.data_dir.startswith("/")  # the emptyDir, not the read-only cwd


def test_service_pdb_and_hpa_point_at_the_deployment() -> None:
    kinds = _kustomized()
    dep = kinds["Deployment"]
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert kinds["Service"]["spec"]["selector"].items() <= labels.items()
    assert kinds["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    port = _container(dep)["ports"][0]
    assert kinds["Service"]["spec"]["ports"][0]["targetPort"] == port["name"]
    assert port["containerPort"] == _config_in_configmap().listen.port
    (optional,) = _docs(K8S / "hpa-queue-depth.yaml")
    for hpa in (kinds["HorizontalPodAutoscaler"], optional):
        assert hpa["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"]
    pods = [m for m in optional["spec"]["metrics"] if m["type"] == "Pods"]
    assert pods[0]["pods"]["metric"]["name"] == "aai_gateway_queue_depth"


# -- metric names in the dashboard and the alerts -----------------------------------------

_FUNCTIONS_AND_KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
    "bool", "offset", "le", "inf", "nan",
}  # fmt: skip


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: identifiers that are not functions,
    keywords, label names (in matchers and by/without/on lists), strings or Grafana variables."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)  # strings
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)  # ranges, $__rate_interval included
    text = re.sub(r"\$\w+|\$\{[^}]*\}", "", text)  # Grafana variables
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        if text[m.end() :].lstrip().startswith("("):
            continue  # a function (sum, rate, histogram_quantile, ...)
        if m.group().lower() in _FUNCTIONS_AND_KEYWORDS or re.fullmatch(r"\d*e\d+", m.group()):
            continue
        names.add(m.group())
    return names


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def dashboard_exprs() -> dict[str, str]:
    dash = json.loads(DASHBOARD.read_text())
    return {
        f"{p['title']} [{t['refId']}]": t["expr"]
        for p in _panels(dash["panels"])
        for t in p.get("targets", [])
    }


def alert_exprs() -> dict[str, str]:
    doc = yaml.safe_load(ALERTS.read_text())
    return {r["alert"]: r["expr"] for g in doc["groups"] for r in g["rules"]}


def test_metric_names_are_read_from_promql() -> None:
    expr = (
        "histogram_quantile(0.99, sum by (le, group) "
        '(rate(aai_gateway_wait_seconds_bucket{group="rest"}[5m])))'
        " / on (limit) max(aai_gateway_tokens_capacity) > 1e3 and sum(x[$__rate_interval]) * 60"
    )
    assert metric_names(expr) == {"aai_gateway_wait_seconds_bucket", "aai_gateway_tokens_capacity", "x"}


async def _exported_names() -> set[str]:
    """Every sample name the gateway's /metrics may carry: those a scrape after a little
    traffic shows, and those its declared families give (a labelled family shows no sample
    until its first event): a counter ``_total``, a histogram ``_bucket``/``_sum``/``_count``."""
    async with stack() as run:
        async with aiohttp.ClientSession(headers={"Authorization": "test-key"}) as http:
            for path in ("/v2/transcript/nope", "/v2/transcript?limit=1", "/healthz"):
                async with http.get(run.url + path) as resp:
                    await resp.read()
            async with http.get(run.url + "/metrics") as resp:
                assert resp.status == 200
                scraped = {
                    s.name for fam in text_string_to_metric_families(await resp.text()) for s in fam.samples
                }
        declared: set[str] = set()
        for fam in run.registry.collect():
            if fam.type == "counter":
                declared.add(fam.name + "_total")
            elif fam.type == "histogram":
                declared |= {fam.name + "_bucket", fam.name + "_sum", fam.name + "_count"}
            else:
                declared.add(fam.name)
    # The derivation matches what is served, and the traffic reached the proxy's metrics.
    assert scraped <= declared, scraped - declared
    assert {"aai_gateway_upstream_responses_total", "aai_gateway_upstream_seconds_bucket"} <= scraped
    return declared


async def test_dashboard_and_alerts_name_only_metrics_the_gateway_exports() -> None:
    exported = await _exported_names()
    for source, exprs in (("dashboard", dashboard_exprs()), ("alerts.yml", alert_exprs())):
        assert exprs
        for where, expr in exprs.items():
            names = metric_names(expr)
            assert names, f"{source}: {where}: no metric in {expr!r}"
            assert names <= exported, f"{source}: {where}: not exported: {sorted(names - exported)}"


def test_the_dashboard_covers_what_the_issue_asks() -> None:
    dash = json.loads(DASHBOARD.read_text())
    panels = [p for p in _panels(dash["panels"]) if p["type"] != "row"]
    ids = [p["id"] for p in _panels(dash["panels"])]
    assert len(ids) == len(set(ids))
    assert dash["uid"] == "aai-gateway"
    for p in panels:
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        assert p["targets"], p["title"]
    read = set().union(*(metric_names(e) for e in dashboard_exprs().values()))
    assert {
        "aai_gateway_tokens_in_use", "aai_gateway_tokens_capacity", "aai_gateway_queue_depth",
        "aai_gateway_wait_seconds_bucket", "aai_gateway_refusals_total",
        "aai_gateway_upstream_responses_total", "aai_gateway_upstream_seconds_bucket",
        "aai_gateway_sessions_open", "aai_gateway_jobs_queued", "aai_gateway_jobs_running",
        "aai_gateway_store_errors_total", "aai_gateway_store_degraded", "aai_gateway_spend_usd_total",
    } <= read  # fmt: skip


def test_the_alerts_cover_what_the_issue_asks() -> None:
    exprs = alert_exprs()
    read = set().union(*(metric_names(e) for e in exprs.values()))
    assert {
        "aai_gateway_queue_depth", "aai_gateway_wait_seconds_bucket", "aai_gateway_refusals_total",
        "aai_gateway_store_degraded", "aai_gateway_tokens_in_use", "aai_gateway_webhook_relays_total",
        "aai_gateway_dispatch_paused", "aai_gateway_sessions_ended_total",
        "aai_gateway_spend_cap_refusals_total",
    } <= read  # fmt: skip
    assert 'reason=~"idle|max_duration|spend_cap"' in exprs["AaiGatewaySessionsEndedByGuard"]
    doc = yaml.safe_load(ALERTS.read_text())
    for group in doc["groups"]:
        for rule in group["rules"]:
            assert rule["labels"]["severity"] in ("info", "warning", "critical"), rule["alert"]
            assert rule["annotations"]["summary"], rule["alert"]


def test_promtool_accepts_the_alerts() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        _missing("promtool", "apt-get install prometheus (Debian's package; .ci/run installs it)")
    done = subprocess.run(
        [promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(alert_exprs())} rules found" in done.stdout


# Series in, alerts out (promtool's rule unit tests): the guard's reasons fire and a client's
# own Terminate does not; a paused dispatch and a degraded replica fire after their `for`.
PROMTOOL_CASES = """
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'aai_gateway_sessions_ended_total{instance="a", reason="idle"}'
        values: '0 0 1 1 1'
      - series: 'aai_gateway_sessions_ended_total{instance="a", reason="client"}'
        values: '0 5 10 15 20'
      - series: 'aai_gateway_dispatch_paused{instance="a"}'
        values: '0 1 1 1 1'
      - series: 'aai_gateway_store_degraded{instance="b"}'
        values: '0 0 1 1 1'
    alert_rule_test:
      - eval_time: 4m
        alertname: AaiGatewaySessionsEndedByGuard
        exp_alerts:
          - exp_labels: {severity: info, reason: idle}
      - eval_time: 4m
        alertname: AaiGatewayDispatchPaused
        exp_alerts:
          - exp_labels: {severity: critical}
      - eval_time: 2m
        alertname: AaiGatewayRedisDegraded
        exp_alerts: []
      - eval_time: 4m
        alertname: AaiGatewayRedisDegraded
        exp_alerts:
          - exp_labels: {severity: critical, instance: b}
"""


def test_promtool_fires_the_alerts_on_their_series(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        _missing("promtool", "apt-get install prometheus (Debian's package; .ci/run installs it)")
    # promtool compares rendered annotations too: test the rules' logic on a copy without them.
    rules = yaml.safe_load(ALERTS.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations")
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(rules))
    cases = tmp_path / "alerts_test.yml"
    cases.write_text("rule_files: [alerts.yml]\n" + PROMTOOL_CASES)
    done = subprocess.run([promtool, "test", "rules", str(cases)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_optional_redis_keeps_jobs_and_is_where_the_configmap_looks() -> None:
    docs = {d["kind"]: d for d in _docs(K8S / "redis.yaml")}
    assert set(docs) == {"Service", "StatefulSet"}
    assert docs["Service"]["metadata"]["name"] == "redis"
    assert docs["Service"]["spec"]["ports"][0]["port"] == 6379
    assert _config_in_configmap().redis.url == "redis://redis:6379/0"
    (container,) = docs["StatefulSet"]["spec"]["template"]["spec"]["containers"]
    args = " ".join(container["args"])
    assert "--appendonly yes" in args and "--maxmemory-policy noeviction" in args
    assert docs["StatefulSet"]["spec"]["volumeClaimTemplates"], "AOF on a persistent volume"
    assert "redis.yaml" not in yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]


def test_the_optional_ingress_outlasts_the_gateway_s_own_timeouts() -> None:
    config = Config.model_validate({})
    ingresses = {d["metadata"]["name"]: d for d in _docs(K8S / "ingress.yaml")}
    rest, stream = ingresses["aai-gateway"], ingresses["aai-gateway-streaming"]
    read = "nginx.ingress.kubernetes.io/proxy-read-timeout"
    assert int(rest["metadata"]["annotations"][read]) > config.upstream.read_timeout_s
    assert int(stream["metadata"]["annotations"][read]) > config.streaming.max_duration_s
    assert stream["spec"]["rules"][0]["http"]["paths"][0]["path"] == "/v3/ws"
    for ing in (rest, stream):
        backend = ing["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
        assert backend == {"name": "aai-gateway", "port": {"name": "http"}}
