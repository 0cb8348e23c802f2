"""The operations folder: dashboard, alert rules, scrape config, image and manifests, checked against a live service.

The end-to-end part runs the real `streamlearn run` on the embedded broker with
Debian's `prometheus` scraping it (`make prometheus` installs it), reads the
series back through Prometheus's HTTP API and provokes one alert.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import tomllib
import urllib.parse
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from streamlearn.config import parse_config
from streamlearn.stream.broker import free_port
from streamlearn.demo.traffic import TrafficGenerator, TrafficSpec
from tests.conftest import http_get, wait_for

ROOT = Path(__file__).resolve().parent.parent
OPS = ROOT / "ops"
DASHBOARD = OPS / "grafana" / "streamlearn.json"
PROMETHEUS_DIR = OPS / "prometheus"
K8S = OPS / "k8s"
PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (`make prometheus` installs "
                                    "Debian's prometheus package)")
# Skipped on a developer's machine without it; never in CI (CI=true), where `make test` installs it.
needs_prometheus = pytest.mark.skipif(PROMETHEUS is None and not os.environ.get("CI"), reason="prometheus not installed (`make prometheus` "
                                      "installs Debian's prometheus package)")

REQUIRED_ALERTS = {"StreamlearnDown", "StreamlearnForgettingHigh", "StreamlearnConsumerLagGrowing",
                   "StreamlearnSnapshotTooOld", "StreamlearnNoSnapshot", "StreamlearnDeadLetterRateHigh",
                   "StreamlearnDriftStorm", "StreamlearnSnapshotFailures", "StreamlearnGateRejectsEverything",
                   "StreamlearnPublishFailures", "StreamlearnLearnErrors"}
PROVOKED_ALERT = "StreamlearnDeadLetterRateHigh"


# --- PromQL: which series an expression reads -------------------------------------------------------------

# Words that look like series names but are PromQL: aggregations (they may be followed by `by`, not `(`),
# set and grouping operators, modifiers.
PROMQL_WORDS = {"sum", "min", "max", "avg", "count", "stddev", "stdvar", "topk", "bottomk", "quantile",
                "count_values", "group", "by", "without", "on", "ignoring", "group_left", "group_right", "and",
                "or", "unless", "bool", "offset", "atan2", "inf", "nan"}
SYNTHETIC = {"up"}   # made by Prometheus for every target, not exported by the service
GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")


def _strip(expr: str) -> str:
    """The expression without label values, matchers, ranges and Grafana variables (none of them are series)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}", " ", expr)
    expr = re.sub(r"\[[^\]]*\]", " ", expr)
    expr = GROUPING.sub(" ", expr)
    return re.sub(r"\$\w+|\$\{[^}]*\}", " ", expr)


def metric_names(expr: str) -> set[str]:
    """Series names an expression selects: identifiers that are not calls, keywords or numbers.

    >>> sorted(metric_names('histogram_quantile(0.99, sum by (le, model) (rate(a_bucket{model=~"$model"}[5m])))'))
    ['a_bucket']
    >>> sorted(metric_names('up{job="x"} == 1 unless on (job, instance) b_seconds'))
    ['b_seconds', 'up']
    >>> sorted(metric_names('time() - max(c) > 1e3 and sum without (x) (d offset 5m)'))
    ['c', 'd']
    """
    names = set()
    for match in re.finditer(r"(?<![\w.:])([A-Za-z_:][\w:]*)(\s*\()?", _strip(expr)):
        word, call = match.groups()
        if not call and word.lower() not in PROMQL_WORDS:
            names.add(word)
    return names


def label_uses(expr: str) -> tuple[dict[str, set[str]], set[str]]:
    """Label names matched per series (`name{label=...}`), and those grouped on (`by (...)`, `on (...)`)."""
    clean = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    matched: dict[str, set[str]] = {}
    for name, matchers in re.findall(r"([A-Za-z_:][\w:]*)\s*\{([^}]*)\}", clean):
        matched.setdefault(name, set()).update(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers))
    grouped = {label.strip() for _, labels in GROUPING.findall(clean) for label in labels.split(",") if label.strip()}
    return matched, grouped


def dashboard_queries(board: dict) -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target and annotation; template variables are checked apart."""
    queries = [(f"panel {p['id']} {p['title']!r} {t['refId']}", t["expr"])
               for p in board["panels"] for t in p.get("targets", [])]
    queries += [(f"annotation {a['name']!r}", a["expr"]) for a in board["annotations"]["list"] if "expr" in a]
    return queries


def alert_rules() -> list[dict]:
    return [rule for group in yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())["groups"]
            for rule in group["rules"]]


def all_queries() -> list[tuple[str, str]]:
    board = json.loads(DASHBOARD.read_text())
    return dashboard_queries(board) + [(f"alert {r['alert']}", r["expr"]) for r in alert_rules()]


# --- The dashboard ------------------------------------------------------------------------------------------

def test_dashboard_json_is_what_the_generator_writes(tmp_path):
    out = tmp_path / "streamlearn.json"
    result = subprocess.run([sys.executable, str(OPS / "grafana" / "dashboard.py"), str(out)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert out.read_text() == DASHBOARD.read_text(), "run `python ops/grafana/dashboard.py` and commit the JSON"


def test_dashboard_round_trips_through_the_sdk_model():
    """Grafana's dashboard schema as the SDK models it: decoding then encoding gives back every key, unchanged."""
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.cog.plugins import register_default_plugins
    from grafana_foundation_sdk.models import prometheus, stat, timeseries
    from grafana_foundation_sdk.models.dashboard import Dashboard, RowPanel

    register_default_plugins()  # so that panel options and targets decode into their typed models
    data = json.loads(DASHBOARD.read_text())
    model = Dashboard.from_json(data)
    assert json.loads(json.dumps(model, cls=JSONEncoder)) == data
    for panel in model.panels:
        if isinstance(panel, RowPanel):
            continue
        options = {"timeseries": timeseries.Options, "stat": stat.Options}[panel.type_val]
        assert isinstance(panel.options, options), panel.title
        assert all(isinstance(t, prometheus.Dataquery) for t in panel.targets), panel.title


def _overlap(a: dict, b: dict) -> bool:
    """Whether two grid rectangles share a cell."""
    return (a["x"] < b["x"] + b["w"] and b["x"] < a["x"] + a["w"]
            and a["y"] < b["y"] + b["h"] and b["y"] < a["y"] + a["h"])


def test_dashboard_structure():
    board = json.loads(DASHBOARD.read_text())
    assert 8 <= len(board["uid"]) <= 40 and board["title"] == "streamlearn"
    assert isinstance(board["schemaVersion"], int) and board["schemaVersion"] >= 36
    panels = board["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in panels:
        pos = p["gridPos"]
        assert pos["x"] >= 0 and pos["w"] > 0 and pos["x"] + pos["w"] <= 24 and pos["h"] > 0, p["title"]
    for i, a in enumerate(panels):
        for b in panels[i + 1:]:
            assert not _overlap(a["gridPos"], b["gridPos"]), f"{a['title']!r} overlaps {b['title']!r}"
    for p in panels:
        if p["type"] == "row":
            assert p["panels"] == [] and not p["collapsed"], "an open row holds no panels of its own"
            continue
        assert p["type"] in {"timeseries", "stat"} and p["targets"], p["title"]
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t["expr"].strip() and t["refId"] and t["datasource"]["uid"] == "${datasource}", p["title"]


def test_dashboard_variables_and_annotation():
    board = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    model = variables["model"]
    assert model["type"] == "query" and model["datasource"]["uid"] == "${datasource}"
    assert model["query"] == "label_values(streamlearn_examples_learned_total, model)"
    assert model["includeAll"] and model["allValue"] == ".*"
    [drift] = board["annotations"]["list"]
    assert drift["datasource"]["uid"] == "${datasource}" and "streamlearn_drift_detected_total" in drift["expr"]
    uses_model = [expr for _, expr in dashboard_queries(board) if "$model" in expr]
    assert all('model=~"$model"' in expr for expr in uses_model)


# --- Alert rules and scrape config --------------------------------------------------------------------------

def _promtool(*args: str) -> str:
    result = subprocess.run([PROMTOOL, *args], cwd=PROMETHEUS_DIR, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@needs_promtool
def test_promtool_checks_rules_and_config():
    assert f"SUCCESS: {len(REQUIRED_ALERTS)} rules found" in _promtool("check", "rules", "alerts.yml")
    assert "is valid prometheus config file syntax" in _promtool("check", "config", "prometheus.yml")


@needs_promtool
def test_promtool_unit_tests_of_every_alert():
    _promtool("test", "rules", "alerts_test.yml")


def test_alert_rules_are_complete():
    rules = alert_rules()
    assert {r["alert"] for r in rules} == REQUIRED_ALERTS
    for rule in rules:
        assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
        assert {"summary", "description"} <= set(rule["annotations"]), rule["alert"]
        assert "$labels." in rule["annotations"]["description"], f"{rule['alert']}: say which instance or model"
    tests = yaml.safe_load((PROMETHEUS_DIR / "alerts_test.yml").read_text())
    assert tests["rule_files"] == ["alerts.yml"]
    cases = [case for test in tests["tests"] for case in test["alert_rule_test"]]
    fired = {c["alertname"] for c in cases if c["exp_alerts"]}
    assert fired == REQUIRED_ALERTS, "every alert has a case where it fires"
    for test in tests["tests"]:   # ... next to a healthy instance that must stay quiet
        assert any('instance="ok:9108"' in s["series"] for s in test["input_series"]), test["name"]


def test_scrape_config_points_at_the_service():
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    assert config["rule_files"] == ["alerts.yml"]
    [job] = config["scrape_configs"]
    assert job["job_name"] == "streamlearn" and job["metrics_path"] == "/metrics"
    port = parse_config({}, env={}).metrics.port
    assert job["static_configs"][0]["targets"] == [f"streamlearn:{port}"], "the k8s Service name and metrics port"


# --- Image and manifests ------------------------------------------------------------------------------------

def _manifest(name: str) -> dict:
    [doc] = list(yaml.safe_load_all((K8S / name).read_text()))
    return doc


def _cluster_config():
    configmap = _manifest("configmap.yaml")
    assert configmap["kind"] == "ConfigMap" and configmap["metadata"]["name"] == "streamlearn-config"
    data = tomllib.loads(configmap["data"]["config.toml"])
    return parse_config(data, env=_pod_env())


def _pod_env() -> dict[str, str]:
    """The environment the service sees in the pod: the image's ENV, then the container's (secrets as "x")."""
    env = dict(re.findall(r"^ENV (\w+)=(\S+)$", (OPS / "Dockerfile").read_text(), re.M))
    [container] = _manifest("statefulset.yaml")["spec"]["template"]["spec"]["containers"]
    env.update({e["name"]: e.get("value", "x") for e in container["env"]})
    return env


def test_configmap_config_parses_with_the_pod_environment():
    config = _cluster_config()
    assert config.source == "kafka" and config.snapshot.enabled
    assert config.kafka.settings["sasl.password"] == "env:KAFKA_PASSWORD"
    assert config.metrics.host == "0.0.0.0"


def test_statefulset_matches_the_config_and_the_image():
    config = _cluster_config()
    sts = _manifest("statefulset.yaml")
    assert sts["kind"] == "StatefulSet" and sts["spec"]["replicas"] == 1
    pod = sts["spec"]["template"]
    assert sts["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    spec = pod["spec"]
    assert spec["enableServiceLinks"] is False, "service links would inject unknown STREAMLEARN_* settings"
    assert spec["terminationGracePeriodSeconds"] >= 60, "time for the shutdown snapshot"
    [container] = spec["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"metrics": config.metrics.port}
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz"), ("startupProbe", "/healthz")):
        assert container[probe]["httpGet"] == {"path": path, "port": "metrics"}, probe
    annotations = pod["metadata"]["annotations"]
    assert annotations == {"prometheus.io/scrape": "true", "prometheus.io/port": str(config.metrics.port),
                           "prometheus.io/path": "/metrics"}
    secrets = {e["name"]: e["valueFrom"]["secretKeyRef"]["name"] for e in container["env"]}
    assert secrets == {"STREAMLEARN_SNAPSHOT_KEY": "streamlearn-secrets", "KAFKA_PASSWORD": "streamlearn-secrets"}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts == {"state": config.state_dir, "config": "/etc/streamlearn"}
    [claim] = sts["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "state" and claim["spec"]["resources"]["requests"]["storage"]
    assert container["resources"]["requests"]["cpu"] and container["resources"]["limits"]["memory"]
    assert spec["securityContext"]["runAsNonRoot"] and spec["volumes"][0]["configMap"]["name"] == "streamlearn-config"


def test_service_and_kustomization():
    service, sts = _manifest("service.yaml"), _manifest("statefulset.yaml")
    assert service["kind"] == "Service" and service["metadata"]["name"] == sts["spec"]["serviceName"]
    assert service["spec"]["selector"] == sts["spec"]["selector"]["matchLabels"]
    assert service["spec"]["ports"] == [{"name": "metrics", "port": 9108, "targetPort": "metrics"}]
    kustomization = _manifest("kustomization.yaml")
    assert kustomization["kind"] == "Kustomization"
    assert sorted(kustomization["resources"]) == ["configmap.yaml", "service.yaml", "statefulset.yaml"]
    image = sts["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image.split(":")[0] in {i["name"] for i in kustomization["images"]}


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed (optional here)")
def test_kustomization_renders():
    result = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    kinds = sorted(doc["kind"] for doc in yaml.safe_load_all(result.stdout))
    assert kinds == ["ConfigMap", "Service", "StatefulSet"]


def test_the_replicas_overlay_runs_the_same_config_as_a_cluster_under_torchrun():
    kustomization = yaml.safe_load((OPS / "k8s-replicas" / "kustomization.yaml").read_text())
    assert kustomization["resources"][0] == "../k8s"
    patch = yaml.safe_load((OPS / "k8s-replicas" / "statefulset-patch.yaml").read_text())
    [container] = patch["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    command = container["command"]
    replicas = patch["spec"]["replicas"]
    assert command[0] == "torchrun" and f"--nnodes={replicas}" in command and "--nproc-per-node=1" in command
    assert command[command.index("-m") + 1:] == ["streamlearn", "run", "--config", "/etc/streamlearn/config.toml"]
    assert patch["spec"]["podManagementPolicy"] == "Parallel", "the rendezvous needs every pod at once"
    configmap = _manifest("configmap.yaml")
    for rank in range(replicas):   # what torchrun's agent adds for each replica
        config = parse_config(tomllib.loads(configmap["data"]["config.toml"]),
                              env={**_pod_env(), **env, "RANK": str(rank), "WORLD_SIZE": str(replicas)})
        assert config.cluster.replicas == replicas and config.cluster.init_method == "env://"
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert any(config.cluster.snapshot_dir.startswith(m) for m in mounts), "the shared store is not mounted"
    claim = yaml.safe_load((OPS / "k8s-replicas" / "shared-snapshots.yaml").read_text())
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed (optional here)")
def test_the_replicas_overlay_renders():
    result = subprocess.run(["kubectl", "kustomize", str(OPS / "k8s-replicas")], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    docs = list(yaml.safe_load_all(result.stdout))
    assert sorted(d["kind"] for d in docs) == ["ConfigMap", "PersistentVolumeClaim", "Service", "StatefulSet"]
    [sts] = [d for d in docs if d["kind"] == "StatefulSet"]
    assert sts["spec"]["replicas"] == 2 and len(sts["spec"]["template"]["spec"]["volumes"]) == 2


def test_dockerfile():
    text = (OPS / "Dockerfile").read_text()
    config = _cluster_config()
    assert re.search(r"^FROM python:3\.11-slim$", text, re.M)
    assert "-c constraints.txt torch" in text and "torch==2.13.0" in (ROOT / "constraints.txt").read_text()
    assert re.search(r"^USER 10001:10001$", text, re.M) and "useradd" in text
    assert f'VOLUME ["{config.state_dir}"]' in text
    assert re.search(rf"^EXPOSE {config.metrics.port}$", text, re.M)
    assert f"http://127.0.0.1:{config.metrics.port}/healthz" in text
    assert 'ENTRYPOINT ["streamlearn", "run", "--config", "/etc/streamlearn/config.toml"]' in text
    for source in re.findall(r"^COPY (.+) \S+$", text, re.M):
        for path in source.split():
            assert (ROOT / path).exists(), f"COPY {path}: not in the repository"
    sts = _manifest("statefulset.yaml")
    assert sts["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == 10001


# --- A live service on the embedded broker, scraped by a real Prometheus ------------------------------------

@dataclass
class Stack:
    """What the live tests share: the service's metrics port, the broker and topics, Prometheus, the player."""

    metrics_port: int
    bootstrap: str
    topics: dict[str, str]
    prometheus_port: Optional[int]
    player: threading.Thread


def _config_toml(state: Path, bootstrap: str, topics: dict[str, str]) -> str:
    """A config that makes every family appear quickly: a River and a torch model (two classes at most: the
    examples of a third are refused), small probe segments, a snapshot every 2 s, two drift detectors, a
    candidate version every 500 examples."""
    return f"""
state_dir = "{state}"
[kafka]
bootstrap_servers = "{bootstrap}"
group_id = "ops-{topics['feedback']}"
session_timeout_ms = 6000
inference_topic = "{topics['inference-logs']}"
feedback_topic = "{topics['feedback']}"
examples_topic = "{topics['examples']}"
[join]
ttl = 600.0
early_ttl = 60.0
[intake]
max_message_bytes = 65536
[models.fraud]
model = "logreg"
[models.nn]
model = "mlp"
params = {{ hidden = [16] }}
train = {{ batch_size = 16, max_wait = 0.2, max_classes = 2 }}
encoder = {{ numeric_slots = 8, string_slots = 8, hash_buckets = 8 }}
replay = {{ capacity = 200 }}
[drift]
detectors = ["adwin", "page_hinkley"]
page_hinkley_threshold = 10.0
[eval]
segment_size = 200
probe_size = 10
every = 100
segments = 3
[snapshot]
every_seconds = 2.0
keep = 2
[publish]
enabled = true
every_examples = 500
every_seconds = 0.0
topic = "{topics['model-updates']}"
[gate]
min_shadow_examples = 100
holdout_size = 100
[metrics]
host = "127.0.0.1"
port = 0
"""


def _messages(requests: int) -> list[tuple[str, Optional[bytes], bytes]]:
    """(topic kind, key, value): drifting traffic for `fraud` interleaved with pre-joined examples for `nn`."""
    start = time.time() - requests / 50.0 - 60.0   # event times in the recent past: latencies of minutes
    traffic = [(m.topic, m.key, m.value) for m in
               TrafficGenerator(TrafficSpec(requests=requests, seed=7, start_ts=start)).messages()]
    rng = random.Random(3)
    examples = []
    for i in range(requests // 2):
        x = {"x1": rng.uniform(0, 10), "x2": rng.uniform(0, 10), "x3": rng.uniform(0, 10)}
        label = 7 if i % 250 == 249 else int(x["x1"] + x["x2"] > 8)   # a third class: refused (learn_errors)
        examples.append(("examples", None, json.dumps({"id": f"nn-{i}", "ts": start + i / 25.0, "model": "nn",
                                                       "features": x, "label": label}).encode()))
    merged, pending = [], iter(examples)   # one example for every four traffic messages, in event-time order
    for i, message in enumerate(traffic):
        merged.append(message)
        if i % 4 == 0:
            merged.extend(itertools.islice(pending, 1))
    return merged + list(pending)


def produce(bootstrap: str, topics: dict[str, str], messages, pause: float = 0.0, chunk: int = 500) -> None:
    """Produces (kind, key, value) messages, `chunk` at a time with `pause` seconds between chunks."""
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 10})
    for i, (kind, key, value) in enumerate(messages):
        producer.produce(topics[kind], value=value, key=key)
        producer.poll(0)
        if pause and i % chunk == chunk - 1:
            producer.flush(30)
            time.sleep(pause)
    assert producer.flush(30) == 0


def _start_service(tmp: Path, bootstrap: str, topics: dict[str, str]) -> tuple[subprocess.Popen, int, Path]:
    """`streamlearn run` in a child process; returns it, its metrics port and its log file."""
    config = tmp / "config.toml"
    config.write_text(_config_toml(tmp / "state", bootstrap, topics))
    log = tmp / "service.log"
    process = subprocess.Popen([sys.executable, "-m", "streamlearn", "run", "--config", str(config)],
                               stdout=subprocess.DEVNULL, stderr=log.open("w"), cwd=ROOT,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def port() -> Optional[int]:
        assert process.poll() is None, f"the service exited: {log.read_text()[-3000:]}"
        found = re.search(r"metrics on http://[\d.]+:(\d+)/metrics", log.read_text())
        return int(found.group(1)) if found else None
    return process, wait_for(port, timeout=120, what="the service's metrics line"), log


def _prometheus_files(tmp: Path, target_port: int) -> Path:
    """ops/prometheus/prometheus.yml and alerts.yml as they are, but scraping the test's port every second and
    with the provoked alert's `for:` shortened to seconds."""
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    [job] = config["scrape_configs"]
    assert job["job_name"] == "streamlearn" and config["rule_files"] == ["alerts.yml"]
    job.update(scrape_interval="1s", scrape_timeout="1s", static_configs=[{"targets": [f"127.0.0.1:{target_port}"]}])
    rules = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())
    [provoked] = [r for g in rules["groups"] for r in g["rules"] if r["alert"] == PROVOKED_ALERT]
    provoked["for"] = "2s"
    (tmp / "alerts.yml").write_text(yaml.safe_dump(rules))
    path = tmp / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def _start_prometheus(tmp: Path, target_port: int) -> tuple[subprocess.Popen, int]:
    port = free_port()
    log = tmp / "prometheus.log"
    process = subprocess.Popen([PROMETHEUS, f"--config.file={_prometheus_files(tmp, target_port)}",
                                f"--storage.tsdb.path={tmp / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}",
                                "--log.level=warn"], stdout=subprocess.DEVNULL, stderr=log.open("w"), cwd=tmp)

    def ready() -> bool:
        assert process.poll() is None, f"prometheus exited: {log.read_text()[-3000:]}"
        return http_get(port, "/-/ready")[0] == 200
    wait_for(ready, timeout=60, what="prometheus to be ready")
    return process, port


def _stop(process: Optional[subprocess.Popen], sig: int = signal.SIGTERM, timeout: float = 60) -> None:
    if process is None or process.poll() is not None:
        return
    process.send_signal(sig)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)


def _fresh_topics(broker) -> dict[str, str]:
    prefix = f"ops{uuid.uuid4().hex[:8]}"
    names = {kind: f"{prefix}-{kind}" for kind in ("inference-logs", "feedback", "examples")}
    broker.create_topics(names.values(), partitions=2)
    broker.create_topics([n + ".dlq" for n in names.values()] + [f"{prefix}-model-updates"], partitions=1)
    return {**names, "model-updates": f"{prefix}-model-updates"}


@pytest.fixture(scope="module")
def stack(broker, tmp_path_factory) -> Iterator[Stack]:
    """The service on the broker, Prometheus scraping it (when installed), traffic playing for ~15 s."""
    tmp = tmp_path_factory.mktemp("ops")
    topics = _fresh_topics(broker)
    service, metrics_port, log = _start_service(tmp, broker.bootstrap_servers, topics)
    prometheus, prometheus_port = None, None
    try:
        if PROMETHEUS is not None:
            prometheus, prometheus_port = _start_prometheus(tmp, metrics_port)
        player = threading.Thread(target=produce, args=(broker.bootstrap_servers, topics, _messages(6000), 0.4),
                                  daemon=True)
        player.start()
        yield Stack(metrics_port, broker.bootstrap_servers, topics, prometheus_port, player)
        player.join(120)
    finally:
        _stop(prometheus, timeout=30)
        _stop(service)
    assert service.returncode == 0, log.read_text()[-3000:]


def _exported(text: str) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """Each family's series names (declared even when empty), and the label names of the series with samples."""
    suffixes = {"counter": ["_total"], "gauge": [""], "histogram": ["_bucket", "_sum", "_count"]}
    families: dict[str, set[str]] = {}
    sampled: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        families[family.name] = {family.name + s for s in suffixes[family.type]}
        for sample in family.samples:
            families[family.name].add(sample.name)
            sampled.setdefault(sample.name, set()).update(sample.labels)
    return families, sampled


CLUSTER = "streamlearn_cluster_"   # series only replicas export (`cluster.replicas > 1` or a `cluster.snapshot_dir`)
LM = "streamlearn_lm_"             # series only a service with a language model exports
OWN = (CLUSTER, LM)


def queries_on(group: str = "") -> list[tuple[str, str]]:
    """The queries that read the series of one of the `OWN` groups (`group`: its prefix), or ("") of none."""
    def group_of(expr: str) -> str:
        return next((prefix for prefix in OWN if any(n.startswith(prefix) for n in metric_names(expr))), "")

    return [(where, expr) for where, expr in all_queries() if group_of(expr) == group]


def _referenced(group: str = "") -> dict[str, list[str]]:
    """Series name -> where it is queried, over the dashboard and the alert rules."""
    referenced: dict[str, list[str]] = {}
    for where, expr in queries_on(group):
        for name in metric_names(expr) - SYNTHETIC:
            referenced.setdefault(name, []).append(where)
    return referenced


def _scrape_when_sampled(port: int, names: set[str], timeout: float = 120) -> str:
    """Scrapes until every one of `names` has samples (the run provokes them all); names the missing ones."""
    deadline, text = time.monotonic() + timeout, ""
    while time.monotonic() < deadline:
        status, text = http_get(port, "/metrics")
        if status == 200 and names <= set(_exported(text)[1]):
            return text
        time.sleep(0.5)
    missing = sorted(names - set(_exported(text)[1])) if text else "no scrape"
    pytest.fail(f"series still without samples after {timeout} s: {missing}")


def _check_labels(sampled: dict[str, set[str]], queries: list[tuple[str, str]]) -> None:
    """Label names a query matches or groups on exist on the series it reads (job and instance come from
    Prometheus)."""
    for where, expr in queries:
        matched, grouped = label_uses(expr)
        names = metric_names(expr) - SYNTHETIC
        known = set().union(*(sampled[n] for n in names)) | {"job", "instance"}
        for name, used in matched.items():
            if name not in SYNTHETIC:
                extra = used - sampled[name] - {"job", "instance"}
                assert not extra, f"{where}: {name} has no label {extra}"
        assert grouped <= known, f"{where}: groups on {grouped - known}, not labels of {sorted(names)}"


def test_every_query_reads_series_the_service_exports(stack):
    referenced = _referenced()
    assert len(referenced) >= 20 and all(n.startswith("streamlearn_") for n in referenced)
    text = _scrape_when_sampled(stack.metrics_port, set(referenced))
    families, sampled = _exported(text)
    declared = set().union(*families.values())
    assert set(referenced) <= declared
    _check_labels(sampled, queries_on())
    board = json.loads(DASHBOARD.read_text())
    [variable] = [v for v in board["templating"]["list"] if v["name"] == "model"]
    metric, label = re.fullmatch(r"label_values\((\w+), (\w+)\)", variable["query"]).groups()
    assert label in sampled[metric]
    unused = sorted(f for f, series in families.items() if not series & set(referenced))
    assert not unused, f"exported but on no panel and in no rule: {unused}"


def test_the_replica_panels_read_series_a_replica_exports(tmp_path):
    """A replica (here alone, keeping a cluster's snapshots) exports the `streamlearn_cluster_*` series the
    Replicas panels read, and every one of its series carries its `replica` label."""
    from prometheus_client import generate_latest

    from streamlearn.service import Service

    config = parse_config({"state_dir": str(tmp_path), "drift": {"policy": {"enabled": False}},
                           "metrics": {"enabled": False}, "cluster": {"snapshot_dir": str(tmp_path / "shared")}},
                          env={})
    service = Service(config)
    try:
        families, sampled = _exported(generate_latest(service.registry).decode())
    finally:
        service.close()
    referenced = _referenced(CLUSTER)
    assert referenced and set(referenced) <= set().union(*families.values())
    _check_labels(sampled, queries_on(CLUSTER))
    assert all("replica" in labels for labels in sampled.values())
    unused = sorted(f for f, series in families.items() if f.startswith(CLUSTER) and not series & set(referenced))
    assert not unused, f"exported but on no panel: {unused}"


def test_the_language_model_panels_read_series_a_language_model_exports(tmp_path):
    """A service with a language model (the tiny Llama) that learned from conversations exports the
    `streamlearn_lm_*` series the Language models panels read, with the labels they use, every capability scored."""
    from prometheus_client import generate_latest

    from streamlearn.service import Service
    from tests.test_lm import code, events, lm_settings, write

    source = write(tmp_path / "events.jsonl", events(0, 48, code))
    settings = lm_settings(tmp_path, source)
    settings["models"]["chat"]["lm"]["evaluate_every"] = 16
    service = Service(parse_config(settings, env={}))
    try:
        service.run()
        text = generate_latest(service.registry).decode()
    finally:
        service.close()
    families, sampled = _exported(text)
    referenced = _referenced(LM)
    assert referenced and set(referenced) <= set().union(*families.values())
    _check_labels(sampled, queries_on(LM))
    unused = sorted(f for f, series in families.items() if f.startswith(LM) and not series & set(referenced))
    assert not unused, f"exported but on no panel: {unused}"
    scores = {s.labels["capability"]: s.value for f in text_string_to_metric_families(text)
              if f.name == LM + "capability_score" for s in f.samples}
    assert set(scores) == {"codes"} and scores["codes"] < 0   # minus a loss per token


def _query(port: int, expr: str) -> list[dict]:
    status, body = http_get(port, "/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
    assert status == 200, body
    return json.loads(body)["data"]["result"]


def _values(port: int, expr: str) -> list[float]:
    return [float(r["value"][1]) for r in _query(port, expr)]


@needs_prometheus
def test_prometheus_reads_forgetting_drift_and_latency_back(stack):
    port = stack.prometheus_port
    wait_for(lambda: _values(port, 'up{job="streamlearn"}') == [1.0], timeout=60, what="a successful scrape")
    forgetting = wait_for(lambda: _values(port, "streamlearn_forgetting"), timeout=180, what="streamlearn_forgetting")
    assert all(-1.0 <= v <= 1.0 for v in forgetting)
    wait_for(lambda: sum(_values(port, "streamlearn_drift_detected_total")) > 0, timeout=180,
             what="a drift detected on the drifting traffic")
    for metric, by in (("loop_latency_seconds", "model"), ("queueing_seconds", "topic"),
                       ("processing_seconds", "model")):
        expr = f"histogram_quantile(0.99, sum by (le, {by}) (rate(streamlearn_{metric}_bucket[10m])))"
        finite = wait_for(lambda: [v for v in _values(port, expr) if v == v and v >= 0], timeout=120, what=expr)
        assert finite, expr
    rules = json.loads(http_get(port, "/api/v1/rules")[1])["data"]["groups"]
    assert {r["name"] for g in rules for r in g["rules"]} == REQUIRED_ALERTS
    assert all(r["health"] == "ok" for g in rules for r in g["rules"]), rules


def _alerts(port: int, name: str) -> list[dict]:
    body = json.loads(http_get(port, "/api/v1/alerts")[1])
    return [a for a in body["data"]["alerts"] if a["labels"]["alertname"] == name]


def _dead_letter_ratio(port: int, topic: str) -> list[float]:
    """The provoked rule's expression without its bound, for one topic."""
    [rule] = [r for r in alert_rules() if r["alert"] == PROVOKED_ALERT]
    ratio = rule["expr"].strip().rsplit(">", 1)[0]
    return [float(r["value"][1]) for r in _query(port, ratio) if r["metric"].get("topic") == topic]


@needs_prometheus
def test_dead_letter_alert_fires_when_a_producer_sends_garbage(stack):
    port, topic = stack.prometheus_port, stack.topics["inference-logs"]
    stack.player.join(120)   # the healthy traffic (about 1% malformed) has been sent ...

    def quiet() -> bool:     # ... the rule sees it, under its 5% bound, and does not fire
        ratio = _dead_letter_ratio(port, topic)   # NaN once no message at all came in the last 5 minutes
        return bool(ratio) and not any(v >= 0.05 for v in ratio) and not _alerts(port, PROVOKED_ALERT)
    wait_for(quiet, timeout=120, what=f"{PROVOKED_ALERT} evaluated and quiet on healthy traffic")
    produce(stack.bootstrap, stack.topics, [("inference-logs", None, b"{not json %d" % i) for i in range(3000)])

    def firing() -> list[dict]:
        return [a for a in _alerts(port, PROVOKED_ALERT) if a["state"] == "firing" and a["labels"]["topic"] == topic]
    [alert] = wait_for(firing, timeout=180, what=f"{PROVOKED_ALERT} to fire")
    assert alert["labels"]["severity"] == "warning" and alert["labels"]["job"] == "streamlearn"
    assert alert["annotations"]["summary"].endswith(f"of {topic} goes to dead letters")
    assert max(_dead_letter_ratio(port, topic)) > 0.05
