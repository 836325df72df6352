"""The Helm chart (deploy/helm/conceptseg), the KServe example and the Prometheus adapter rule,
checked offline: no cluster, no helm binary.

The chart is rendered by Helm's own Go engine (the ``helm-python-sdk`` wheel: Helm 4's SDK behind
a C ABI) with the default values, each example values file and one case that turns the optional
parts on; every object is validated against the Kubernetes 1.30 schemas (``kubernetes-validate``,
strict: unknown fields fail), the custom resources against the minimal schemas of
``crd_schemas.py``. The container commands are parsed by the real ``conceptseg`` CLI parser, and
image, ports and model names are compared with what ``serve`` uses.

Run: .venv/bin/pytest tests/deploy/test_chart.py -q
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml
from crd_schemas import is_custom, validate_custom

from conceptseg.cli import build_parser
from conceptseg.gpu_stack import load as load_gpu_stack
from conceptseg.serving.repository import ENGINE_MODELS, MODELS
from conceptseg.serving.server import ServeConfig

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
CHART = DEPLOY / "helm" / "conceptseg"
K8S_VERSION = "1.30.0"  # the schemas every object must satisfy (kubeVersion in Chart.yaml: >=1.27)
RELEASE, NAMESPACE = "conceptseg", "ml"
HEALTH = {"/v2/health/live", "/v2/health/ready"}  # Triton's; open without the API key

# every optional part on at once: init-container plans, chart-made Secret, headless Service
OPTIONAL_ON = {
    "plans": {"build": True, "precision": "fp16"},
    "apiKey": {"create": True, "value": "test-key"},
    "service": {"headless": True},
    "metrics": {"serviceMonitor": {"enabled": True}},
    "serve": {"mllmPath": "/models/engines/trtllm-fp8", "extraArgs": ["--max-new-tokens", "512"]},
}
CASES = {
    "default": {},
    "3b": yaml.safe_load((CHART / "values-3b.yaml").read_text()),
    "7b": yaml.safe_load((CHART / "values-7b.yaml").read_text()),
    "optional-on": OPTIONAL_ON,
}


def render(values: dict[str, Any], release: str = RELEASE) -> list[dict[str, Any]]:
    """The chart's objects for ``values`` (over values.yaml), as ``helm template`` renders them."""
    with helm.Chart.load(str(CHART)) as chart:
        files = chart.render(values, name=release, namespace=NAMESPACE)
    objects = []
    for name, text in sorted(files.items()):
        if name.endswith(".yaml"):
            objects += [doc for doc in yaml.safe_load_all(text) if doc]
    return objects


@pytest.fixture(scope="module", params=sorted(CASES))
def rendered(request) -> tuple[str, list[dict[str, Any]]]:
    return request.param, render(CASES[request.param])


def one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {[o['metadata']['name'] for o in found]}"
    return found[0]


def by_name(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    return next(o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name)


def parse_cli(container: dict[str, Any]) -> Any:
    """The container's command line through the real ``conceptseg`` parser (unknown flags fail)."""
    assert container["command"] == ["conceptseg"], container["command"]
    return build_parser().parse_args([str(a) for a in container["args"]])


def serve_ports(args: Any) -> dict[str, int]:
    return {"http": args.http_port, "grpc": args.grpc_port, "metrics": args.metrics_port}


def port_number(container: dict[str, Any], port: int | str) -> int:
    """A probe's or Service's target port: a number, or the name of a containerPort."""
    if isinstance(port, int):
        return port
    named = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    assert port in named, f"port {port!r} is not a containerPort name of {container['name']}"
    return named[port]


def adapter_rule() -> dict[str, Any]:
    values = yaml.safe_load((DEPLOY / "prometheus-adapter" / "values.yaml").read_text())
    (rule,) = values["rules"]["custom"]
    return rule


def test_chart_lints():
    report = helm.lint(str(CHART), kube_version=K8S_VERSION, strict=True)
    assert report["errors"] == [], report
    worse_than_info = [m for m in report["messages"] if m["severity"] > 1]
    assert not worse_than_info, worse_than_info


def test_every_object_validates(rendered):
    case, objects = rendered
    assert objects, f"{case}: nothing rendered"
    for obj in objects:
        where = f"{case}: {obj['kind']}/{obj['metadata']['name']}"
        try:
            if is_custom(obj):
                validate_custom(obj, K8S_VERSION)
            else:
                kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{where}: {exc.message} at {'/'.join(map(str, exc.path))}")


def test_rendered_kinds(rendered):
    case, objects = rendered
    kinds = sorted(o["kind"] for o in objects)
    values = CASES[case]
    expected = ["Deployment", "PodDisruptionBudget", "Service"]
    expected += (
        ["PersistentVolumeClaim"] if not values.get("models", {}).get("existingClaim") else []
    )
    expected += ["HorizontalPodAutoscaler"] if values.get("autoscaling", {}).get("enabled") else []
    expected += (
        ["ServiceMonitor"]
        if values.get("metrics", {}).get("serviceMonitor", {}).get("enabled")
        else []
    )
    expected += ["Secret"] if values.get("apiKey", {}).get("create") else []
    expected += ["Service"] if values.get("service", {}).get("headless") else []
    assert kinds == sorted(expected), f"{case}: {kinds}"


def test_kserve_and_adapter_validate():
    for path in sorted((DEPLOY / "kserve").glob("*.yaml")):
        for obj in yaml.safe_load_all(path.read_text()):
            assert is_custom(obj), f"{path.name}: {obj['kind']} has no schema in crd_schemas.py"
            validate_custom(obj, K8S_VERSION)
    rule = adapter_rule()
    assert set(rule) == {"seriesQuery", "resources", "name", "metricsQuery"}, sorted(rule)


def test_image_is_gpu_stacks(rendered):
    """One image everywhere: values.yaml and Chart.yaml's appVersion equal gpu_stack.toml's."""
    stack = load_gpu_stack()
    values = yaml.safe_load((CHART / "values.yaml").read_text())["image"]
    assert f"{values['repository']}:{values['tag']}" == stack.image, (
        f"deploy/helm/conceptseg/values.yaml image {values['repository']}:{values['tag']} != "
        f"{stack.image} (runtime/conceptseg/gpu_stack.toml): set image.tag and Chart.yaml appVersion"
    )
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert f"{stack.image_name}:{chart['appVersion']}" == stack.image, chart["appVersion"]
    case, objects = rendered
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    for container in pod["containers"] + pod.get("initContainers", []):
        assert container["image"] == stack.image, f"{case}: {container['name']}"


def test_ports_are_serves_defaults():
    values = yaml.safe_load((CHART / "values.yaml").read_text())["serve"]["ports"]
    defaults = {f.name: f.default for f in dataclasses.fields(ServeConfig)}
    assert values == {k: defaults[f"{k}_port"] for k in ("http", "grpc", "metrics")}, values


def test_container_runs_serve_and_probes_hit_its_ports(rendered):
    case, objects = rendered
    deployment = one(objects, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    args = parse_cli(container)
    assert (args.command, args.profile, args.host) == ("serve", "gpu", "0.0.0.0"), args
    assert args.tritonserver and args.backend_dir, "the NGC image's Triton (gpu profile)"
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert any(str(args.engines).startswith(p + "/") for p in mounts), (args.engines, sorted(mounts))
    ports = serve_ports(args)
    opened = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert opened == ports, f"{case}: containerPorts {opened} != serve's {ports}"
    for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
        probe = container[kind]["httpGet"]
        assert probe["path"] in HEALTH and "httpHeaders" not in probe, (kind, probe)
        assert port_number(container, probe["port"]) == ports["http"], (kind, probe)
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    if annotations.get("prometheus.io/scrape") == "true":
        assert int(annotations["prometheus.io/port"]) == ports["metrics"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    for service in (o for o in objects if o["kind"] == "Service"):
        assert service["spec"]["selector"].items() <= labels.items(), service["metadata"]["name"]
        for port in service["spec"]["ports"]:
            assert port_number(container, port["targetPort"]) == ports[port["name"]], port


def test_plans_init_container_feeds_serve(rendered):
    case, objects = rendered
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    serve = parse_cli(pod["containers"][0])
    inits = pod.get("initContainers", [])
    if not inits:
        assert serve.plans is None, f"{case}: --plans without a build step"
        return
    (init,) = inits
    build = parse_cli(init)
    assert build.command == "build-engines"
    assert build.onnx == Path(serve.engines) and build.out == Path(serve.plans), (build, serve)
    plans_mount = next(m for m in init["volumeMounts"] if build.out.is_relative_to(m["mountPath"]))
    assert not plans_mount.get("readOnly"), "the init container writes the plans"
    assert init["resources"] == pod["containers"][0]["resources"], "same GPUs"


def test_gpus_and_tensor_parallel(rendered):
    case, objects = rendered
    template = one(objects, "Deployment")["spec"]["template"]
    values = CASES[case]
    gpus = values.get("gpu", {}).get("count", 1)
    resources = template["spec"]["containers"][0]["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == gpus
    tp = int(template["metadata"]["annotations"]["conceptseg/mllm-tensor-parallel-size"])
    assert tp == values.get("mllm", {}).get("tensorParallelSize", 1) <= gpus
    if case == "7b":
        assert (gpus, tp) == (2, 2)


def test_tensor_parallel_beyond_gpus_fails():
    with pytest.raises(helm.HelmError, match="gpu.count >= 2"):
        render({"gpu": {"count": 1}, "mllm": {"tensorParallelSize": 2}})


def test_api_key_comes_from_the_secret(rendered):
    case, objects = rendered
    container = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in container.get("env", [])}
    api_key = CASES[case].get("apiKey", {})
    if not (api_key.get("existingSecret") or api_key.get("create")):
        assert "CONCEPTSEG_API_KEY" not in env, case
        return
    ref = env["CONCEPTSEG_API_KEY"]["valueFrom"]["secretKeyRef"]
    if api_key.get("create"):
        secret = one(objects, "Secret")
        assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"]
    else:
        assert ref == {"name": api_key["existingSecret"], "key": "api-key"}


def test_autoscaler_metric_is_the_adapters():
    objects = render(CASES["3b"])
    hpa, deployment = one(objects, "HorizontalPodAutoscaler"), one(objects, "Deployment")
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    (metric,) = hpa["spec"]["metrics"]
    rule = adapter_rule()
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == rule["name"]["as"]
    assert rule["name"]["matches"] == "^nv_inference_pending_request_count$"
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
    # the entry models: what clients call; the inner models' requests come from the orchestrator
    models = set(re.search(r'model=~"([^"]+)"', rule["metricsQuery"]).group(1).split("|"))
    assert models == set(MODELS) - set(ENGINE_MODELS) - {"mllm"}, models
    # the ServiceMonitor scrapes the Service's metrics port (it adds the namespace/pod labels)
    monitor, service = one(objects, "ServiceMonitor"), by_name(objects, "Service", RELEASE)
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )


def test_disruption_budget_covers_the_pods(rendered):
    case, objects = rendered
    pdb, deployment = one(objects, "PodDisruptionBudget"), one(objects, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items(), case
    assert pdb["spec"]["maxUnavailable"] == 1


def test_kserve_runtime_serves_the_same_way():
    stack = load_gpu_stack()
    runtime = yaml.safe_load((DEPLOY / "kserve" / "servingruntime.yaml").read_text())
    isvc = yaml.safe_load((DEPLOY / "kserve" / "inferenceservice.yaml").read_text())
    (container,) = runtime["spec"]["containers"]
    assert container["image"] == stack.image, f"servingruntime.yaml image != {stack.image}"
    args = parse_cli(container)
    assert (args.command, args.profile, args.host) == ("serve", "gpu", "0.0.0.0"), args
    # KServe's Triton runtime ports: HTTP 8080 (what KServe routes to), gRPC 9000
    assert (args.http_port, args.grpc_port) == (8080, 9000), args
    assert {p["containerPort"] for p in container["ports"]} == {args.http_port}
    annotations = runtime["spec"]["annotations"]
    assert int(annotations["prometheus.kserve.io/port"]) == args.metrics_port
    for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
        probe = container[kind]["httpGet"]
        assert probe["path"] in HEALTH and port_number(container, probe["port"]) == args.http_port
    model = isvc["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    formats = {(f["name"], f.get("version")) for f in runtime["spec"]["supportedModelFormats"]}
    assert (model["modelFormat"]["name"], model["modelFormat"].get("version")) in formats
    # the chart's models volume (release "conceptseg"), mounted where the chart mounts it
    chart_pod = one(render({}), "Deployment")["spec"]["template"]["spec"]
    chart_claim = next(v for v in chart_pod["volumes"] if v["name"] == "models")
    isvc_claim = next(v for v in isvc["spec"]["predictor"]["volumes"] if v["name"] == "models")
    assert isvc_claim == chart_claim, (isvc_claim, chart_claim)
    mount = next(m for m in model["volumeMounts"] if m["name"] == "models")
    assert str(args.engines).startswith(mount["mountPath"] + "/"), (args.engines, mount)
    parse_chart = parse_cli(chart_pod["containers"][0])
    assert args.engines == parse_chart.engines


def test_validation_is_strict():
    """A misspelt field fails, in a core object and in a custom resource alike."""
    objects = render(CASES["3b"])
    deployment, monitor = one(objects, "Deployment"), one(objects, "ServiceMonitor")
    deployment["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError, match="livenesProbe"):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)
    monitor["spec"]["endpoints"][0]["targetport"] = "metrics"
    with pytest.raises(jsonschema.ValidationError, match="targetport"):
        validate_custom(monitor, K8S_VERSION)
    runtime = yaml.safe_load((DEPLOY / "kserve" / "servingruntime.yaml").read_text())
    runtime["spec"]["containers"][0]["readinessprobe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError, match="readinessprobe"):
        validate_custom(runtime, K8S_VERSION)
