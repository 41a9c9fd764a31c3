"""Kubernetes scales on the scoring queue (deploy/k8s/hpa.yaml): the manifests render with
`kubectl kustomize` (the default, the CPU fallback component, the prometheus-adapter config) and
validate; the ServiceMonitor scrapes the Service's /metrics; the HPA asks for a metric that the
adapter's rules serve, for the Deployment, with room for the PDB; and every metric those name is
on a live /metrics of the app. The adapter is reproduced by tests/support/k8s_adapter.py.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.support.commands import run_ok
from tests.support.k8s_adapter import (
    CONFIG,
    load_rules,
    metric_name,
    render_metrics_query,
    series_name,
)
from tests.unit.deploy.test_deploy_files import (
    K8S,
    KUBERNETES_VERSIONS,
    _need,
    is_custom_resource,
)

ADAPTER = CONFIG.parent
QUEUE_METRIC = "cappy_queue_expected_wait_seconds"
# The lines of deploy/k8s/kustomization.yaml that a user uncomments for the CPU fallback.
CPU_COMPONENT_COMMENTED = "# components:\n#   - cpu-autoscaling\n"
CPU_COMPONENT = "components:\n  - cpu-autoscaling\n"


def _render(directory: Path) -> list[dict[str, Any]]:
    kubectl = _need("kubectl", "kubectl is not on PATH")
    done = run_ok([kubectl, "kustomize", str(directory)], timeout=60)
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def _one(resources: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (found,) = [r for r in resources if r["kind"] == kind]
    return found


@pytest.fixture(scope="module")
def default() -> list[dict[str, Any]]:
    """`kubectl kustomize deploy/k8s`: what `kubectl apply -k deploy/k8s` applies."""
    return _render(K8S)


@pytest.fixture(scope="module")
def cpu_fallback(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """deploy/k8s with the CPU component switched on as the README says: uncommented."""
    copy = tmp_path_factory.mktemp("k8s") / "k8s"
    shutil.copytree(K8S, copy)
    kustomization = copy / "kustomization.yaml"
    text = kustomization.read_text(encoding="utf-8")
    assert CPU_COMPONENT_COMMENTED in text
    kustomization.write_text(text.replace(CPU_COMPONENT_COMMENTED, CPU_COMPONENT), "utf-8")
    return _render(copy)


@pytest.fixture(scope="module")
def adapter_config() -> list[dict[str, Any]]:
    """`kubectl kustomize deploy/k8s/prometheus-adapter`: the adapter's ConfigMap."""
    return _render(ADAPTER)


def _quantity(value: str | int | float) -> float:
    """A Kubernetes quantity of the forms the HPA uses here: "2", "1.5", "500m"."""
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _max_queue_wait_s(resources: list[dict[str, Any]]) -> float:
    from service.settings import Settings

    data = _one(resources, "ConfigMap")["data"]
    default = Settings.model_fields["max_queue_wait_s"].default
    return float(data.get("CAPPY_MAX_QUEUE_WAIT_S", default))


# --- rendering and schemas ----------------------------------------------------------------------


def test_the_default_scales_on_the_queue_and_the_fallback_on_cpu(
    default: list[dict[str, Any]], cpu_fallback: list[dict[str, Any]]
) -> None:
    (queue,) = _one(default, "HorizontalPodAutoscaler")["spec"]["metrics"]
    assert queue["type"] == "Pods" and queue["pods"]["metric"]["name"] == QUEUE_METRIC
    assert _one(default, "ServiceMonitor")

    (cpu,) = _one(cpu_fallback, "HorizontalPodAutoscaler")["spec"]["metrics"]
    assert cpu["type"] == "Resource" and cpu["resource"]["name"] == "cpu"
    # Without the Prometheus Operator there is no ServiceMonitor kind to apply.
    assert not any(is_custom_resource(r) for r in cpu_fallback)
    # Only the signal changes: the same objects otherwise, the same scaling bounds and pace.
    assert {(r["kind"], r["metadata"]["name"]) for r in cpu_fallback} == {
        (r["kind"], r["metadata"]["name"]) for r in default if not is_custom_resource(r)
    }
    queue_spec = _one(default, "HorizontalPodAutoscaler")["spec"]
    cpu_spec = _one(cpu_fallback, "HorizontalPodAutoscaler")["spec"]
    assert {**cpu_spec, "metrics": None} == {**queue_spec, "metrics": None}


def test_the_adapter_configmap_carries_config_yaml_under_the_name_the_chart_mounts(
    adapter_config: list[dict[str, Any]],
) -> None:
    (configmap,) = adapter_config
    assert configmap["kind"] == "ConfigMap"
    # The chart mounts the ConfigMap named by rules.existing at /etc/adapter/, reading config.yaml.
    values = yaml.safe_load((ADAPTER / "values.yaml").read_text(encoding="utf-8"))
    assert configmap["metadata"]["name"] == values["rules"]["existing"]
    assert "namespace" not in configmap["metadata"]  # given by `kubectl apply -n`
    assert yaml.safe_load(configmap["data"]["config.yaml"])["rules"] == load_rules()


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_rendered_manifests_validate_against_the_schemas(
    version: str,
    default: list[dict[str, Any]],
    cpu_fallback: list[dict[str, Any]],
    adapter_config: list[dict[str, Any]],
) -> None:
    try:
        import kubernetes_validate
    except ImportError:
        pytest.skip("kubernetes-validate is not installed (pip install kubernetes-validate)")
    for resource in [*default, *cpu_fallback, *adapter_config]:
        if not is_custom_resource(resource):
            kubernetes_validate.validate(resource, version, strict=True)


def test_servicemonitor_scrapes_the_service_metrics_port(default: list[dict[str, Any]]) -> None:
    """The structural check standing in for the schema kubernetes-validate lacks."""
    monitor = _one(default, "ServiceMonitor")
    service = _one(default, "Service")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(monitor) == {"apiVersion", "kind", "metadata", "spec"}
    spec = monitor["spec"]
    # Its own namespace (no namespaceSelector): the Service's, both applied by one kustomization.
    assert set(spec) == {"selector", "endpoints"}
    assert set(spec["selector"]) == {"matchLabels"}
    assert spec["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    # Selects the scorer's Service only, not whatever else shares the app's name.
    assert len(spec["selector"]["matchLabels"]) > 1
    service_ports = {p["name"] for p in service["spec"]["ports"]}
    (endpoint,) = spec["endpoints"]
    assert endpoint["port"] in service_ports and endpoint["path"] == "/metrics"
    assert endpoint.get("scheme", "http") == "http"
    interval = float(endpoint["interval"].removesuffix("s"))
    assert float(endpoint["scrapeTimeout"].removesuffix("s")) <= interval <= 30


# --- the HPA, the adapter and the PDB -----------------------------------------------------------


def test_the_hpa_asks_for_a_metric_the_adapter_serves_per_pod(
    default: list[dict[str, Any]],
) -> None:
    served = {metric_name(rule): rule for rule in load_rules()}
    assert set(served) == {QUEUE_METRIC, "cappy_queue_tokens"}
    hpa = _one(default, "HorizontalPodAutoscaler")
    for metric in hpa["spec"]["metrics"]:
        assert metric["type"] == "Pods"
        rule = served[metric["pods"]["metric"]["name"]]
        # The adapter finds pods by these two labels (the ServiceMonitor's relabeling sets them).
        overrides = rule["resources"]["overrides"]
        assert overrides == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
    for rule in served.values():
        # Without the matchers and the grouping, every pod would get the same, summed value.
        for field in ("<<.Series>>", "<<.LabelMatchers>>", "<<.GroupBy>>"):
            assert field in rule["metricsQuery"], (field, rule)


def test_the_hpa_scales_the_deployment_well_before_pods_refuse_work(
    default: list[dict[str, Any]],
) -> None:
    hpa = _one(default, "HorizontalPodAutoscaler")
    spec = hpa["spec"]
    target = spec["scaleTargetRef"]
    deployment = _one(default, "Deployment")
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        deployment["apiVersion"],
        "Deployment",
        deployment["metadata"]["name"],
    )
    (metric,) = spec["metrics"]
    assert metric["pods"]["target"]["type"] == "AverageValue"
    # Scale out while a new pod can still arrive before the queue reaches the 429 threshold.
    wait = _quantity(metric["pods"]["target"]["averageValue"])
    assert 0 < wait <= _max_queue_wait_s(default) / 4
    # Fast up, slow down.
    behavior = spec["behavior"]
    up = behavior["scaleUp"]["stabilizationWindowSeconds"]
    down = behavior["scaleDown"]["stabilizationWindowSeconds"]
    assert up == 0 and down >= 300

    # A drain at the smallest scale may still evict a pod, and one keeps serving meanwhile.
    pdb = _one(default, "PodDisruptionBudget")
    min_available = pdb["spec"]["minAvailable"]
    assert isinstance(min_available, int) and 1 <= min_available < spec["minReplicas"]
    assert spec["minReplicas"] <= spec["maxReplicas"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


# --- the adapter's rendering (tests/support/k8s_adapter.py) -------------------------------------


def test_render_metrics_query_fills_the_adapter_template() -> None:
    rules = {metric_name(rule): rule for rule in load_rules()}
    query = render_metrics_query(
        rules[QUEUE_METRIC], 'namespace="default",pod=~"cappy-serve-a|cappy-serve-b"', "pod"
    )
    assert query == (
        'max(cappy_queue_expected_wait_seconds{namespace="default",'
        'pod=~"cappy-serve-a|cappy-serve-b"}) by (pod)'
    )
    sample = {
        "seriesQuery": '{__name__="http_requests_total",namespace!=""}',
        "name": {"matches": "^(.*)_total$", "as": "${1}_per_second"},
        "metricsQuery": "sum(rate(<< .Series >>{<<.LabelMatchers>>}[2m])) by (<<.GroupBy>>)",
    }
    assert series_name(sample) == "http_requests_total"
    assert metric_name(sample) == "http_requests_per_second"
    assert metric_name({**sample, "name": {"matches": "^(.*)_total$"}}) == "http_requests"
    assert metric_name({**sample, "name": {"matches": "^http_"}}) == "http_"  # $0: the match
    assert (
        render_metrics_query(sample, 'namespace="ns"', "namespace")
        == 'sum(rate(http_requests_total{namespace="ns"}[2m])) by (namespace)'
    )
    with pytest.raises(ValueError, match="unsupported"):
        render_metrics_query({**sample, "metricsQuery": "<<.Resource>>"}, "", "pod")
    with pytest.raises(ValueError, match="single metric"):
        series_name({"seriesQuery": '{__name__=~"^cappy_.*"}'})


def test_rendered_adapter_queries_parse_as_promql(tmp_path: Path) -> None:
    promtool = _need("promtool", "apt-get install prometheus")
    rules = [
        {
            "record": f"adapter:query_{i}",
            "expr": render_metrics_query(rule, 'namespace="default",pod=~"a|b"', "pod"),
        }
        for i, rule in enumerate(load_rules())
    ]
    path = tmp_path / "adapter_rules.yml"
    path.write_text(
        yaml.safe_dump({"groups": [{"name": "adapter", "rules": rules}]}), encoding="utf-8"
    )
    run_ok([promtool, "check", "rules", str(path)], timeout=60)


# --- the metrics exist on a live /metrics -------------------------------------------------------


async def test_every_metric_the_autoscaling_names_is_on_a_live_metrics_page(
    tiny_export: Path, default: list[dict[str, Any]]
) -> None:
    from tests.integration.conftest import running_app

    named = {series_name(rule) for rule in load_rules()}
    named |= {
        m["pods"]["metric"]["name"]
        for m in _one(default, "HorizontalPodAutoscaler")["spec"]["metrics"]
    }
    async with running_app(tiny_export, api_keys="scrape-test") as client:
        scored = await client.post(
            "/score",
            json={"pairs": [{"instruction": "Name a planet.", "response": "Mars"}]},
            headers={"Authorization": "Bearer scrape-test"},
        )
        assert scored.status_code == 200, scored.text
        # No credentials: the ServiceMonitor scrapes without any.
        page = await client.get("/metrics")
    assert page.status_code == 200, page.text
    samples = {
        sample.name: sample.value
        for family in text_string_to_metric_families(page.text)
        for sample in family.samples
    }
    assert named <= set(samples), sorted(named - set(samples))
    assert samples[QUEUE_METRIC] == 0  # the request was answered: nothing queued
