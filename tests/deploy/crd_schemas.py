"""Offline validation of the custom resources in deploy/: ServiceMonitor, ServingRuntime,
InferenceService. kubernetes-validate ships only the built-in kinds' schemas.

Each CRD gets a minimal strict schema written down here (only the fields deploy/ uses, unknown
fields fail), from the CRD sources:
- ServiceMonitor ``monitoring.coreos.com/v1``: prometheus-operator
  ``Documentation/api.md`` ServiceMonitorSpec (``selector`` required, ``endpoints``,
  ``namespaceSelector.matchNames``) and Endpoint (``port``, ``path``, ``interval``, ``scheme``).
- ServingRuntime ``serving.kserve.io/v1alpha1``: kserve
  ``pkg/apis/serving/v1alpha1/servingruntime_types.go`` ServingRuntimeSpec
  (``supportedModelFormats`` {name, version, autoSelect, priority}, ``protocolVersions``,
  ``multiModel``) + the inlined ServingRuntimePodSpec (``containers``, ``volumes``,
  ``nodeSelector``, ``tolerations``, ``affinity``, ``annotations``, ``labels``).
- InferenceService ``serving.kserve.io/v1beta1``: kserve ``pkg/apis/serving/v1beta1``
  PredictorSpec = ComponentExtensionSpec (``minReplicas``, ``maxReplicas``, ...) + an inlined
  PodSpec; ModelSpec (predictor_model.go) = ``modelFormat``, ``runtime`` + PredictorExtensionSpec
  (``storageUri``, ``runtimeVersion``, ``protocolVersion``) + an inlined core Container.
The Kubernetes parts inside them (containers, volumes, tolerations) are checked against the real
core schemas: they are put into a synthetic Pod that kubernetes-validate checks strictly.
"""

from __future__ import annotations

from typing import Any

import jsonschema
import kubernetes_validate

_STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_METADATA = {
    "type": "object",
    "required": ["name"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string"},
        "namespace": {"type": "string"},
        "labels": _STR_MAP,
        "annotations": _STR_MAP,
    },
}


def _kind(api_version: str, kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": api_version},
            "kind": {"const": kind},
            "metadata": _METADATA,
            "spec": spec,
        },
    }


def _obj(required: list[str], **properties: Any) -> dict[str, Any]:
    return {
        "type": "object",
        "required": required,
        "additionalProperties": False,
        "properties": properties,
    }


_ANY_OBJECT = {"type": "object"}  # a core type, checked by kubernetes-validate (split_pod)
_ANY_LIST = {"type": "array", "items": {"type": "object"}}

SERVICE_MONITOR = _kind(
    "monitoring.coreos.com/v1",
    "ServiceMonitor",
    _obj(
        ["selector", "endpoints"],
        selector=_obj([], matchLabels=_STR_MAP),
        namespaceSelector=_obj(
            [], matchNames={"type": "array", "items": {"type": "string"}}, any={"type": "boolean"}
        ),
        jobLabel={"type": "string"},
        endpoints={
            "type": "array",
            "minItems": 1,
            "items": _obj(
                ["port"],
                port={"type": "string"},
                path={"type": "string", "pattern": "^/"},
                scheme={"enum": ["http", "https"]},
                interval={"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                scrapeTimeout={"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
            ),
        },
    ),
)

_MODEL_FORMAT = _obj(["name"], name={"type": "string"}, version={"type": "string"})
SERVING_RUNTIME = _kind(
    "serving.kserve.io/v1alpha1",
    "ServingRuntime",
    _obj(
        ["supportedModelFormats", "containers"],
        supportedModelFormats={
            "type": "array",
            "minItems": 1,
            "items": _obj(
                ["name"],
                name={"type": "string"},
                version={"type": "string"},
                autoSelect={"type": "boolean"},
                priority={"type": "integer", "minimum": 1},
            ),
        },
        protocolVersions={"type": "array", "items": {"enum": ["v1", "v2", "grpc-v1", "grpc-v2"]}},
        multiModel={"type": "boolean"},
        annotations=_STR_MAP,
        labels=_STR_MAP,
        containers={**_ANY_LIST, "minItems": 1},
        volumes=_ANY_LIST,
        nodeSelector=_STR_MAP,
        tolerations=_ANY_LIST,
        affinity=_ANY_OBJECT,
    ),
)

# ModelSpec's own fields; the rest of the model object is a core Container
_MODEL_FIELDS = {
    "modelFormat": _MODEL_FORMAT,
    "runtime": {"type": "string"},
    "storageUri": {"type": "string"},
    "runtimeVersion": {"type": "string"},
    "protocolVersion": {"enum": ["v1", "v2", "grpc-v1", "grpc-v2"]},
}
# PredictorSpec's ComponentExtensionSpec fields; the rest of the predictor is a core PodSpec
_COMPONENT_FIELDS = {
    "minReplicas": {"type": "integer", "minimum": 0},
    "maxReplicas": {"type": "integer", "minimum": 0},
    "scaleTarget": {"type": "integer"},
    "scaleMetric": {"enum": ["cpu", "memory", "concurrency", "rps"]},
    "containerConcurrency": {"type": "integer"},
    "timeout": {"type": "integer"},
}
INFERENCE_SERVICE = _kind(
    "serving.kserve.io/v1beta1",
    "InferenceService",
    _obj(
        ["predictor"],
        predictor={
            "type": "object",
            "required": ["model"],
            "properties": {
                **_COMPONENT_FIELDS,
                "model": {
                    "type": "object",
                    "required": ["modelFormat"],
                    "properties": _MODEL_FIELDS,
                },
            },
        },
    ),
)

SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): SERVICE_MONITOR,
    ("serving.kserve.io/v1alpha1", "ServingRuntime"): SERVING_RUNTIME,
    ("serving.kserve.io/v1beta1", "InferenceService"): INFERENCE_SERVICE,
}


def is_custom(obj: dict[str, Any]) -> bool:
    return (obj["apiVersion"], obj["kind"]) in SCHEMAS


def split_pod(obj: dict[str, Any]) -> dict[str, Any]:
    """The core Kubernetes parts of a custom resource as a synthetic Pod."""
    spec = obj["spec"]
    if obj["kind"] == "ServingRuntime":
        pod_keys = ("containers", "volumes", "nodeSelector", "tolerations", "affinity")
        pod = {k: spec[k] for k in pod_keys if k in spec}
    elif obj["kind"] == "InferenceService":
        predictor = spec["predictor"]
        own = {"model", *_COMPONENT_FIELDS}
        pod = {k: v for k, v in predictor.items() if k not in own}
        container = {k: v for k, v in predictor["model"].items() if k not in _MODEL_FIELDS}
        pod["containers"] = [{"name": "kserve-container", **container}]  # KServe's default name
    else:
        pod = {"containers": [{"name": "none", "image": "none"}]}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "check"}, "spec": pod}


def validate_custom(obj: dict[str, Any], k8s_version: str) -> None:
    """Raise ``jsonschema.ValidationError`` (or kubernetes-validate's) when ``obj`` is invalid."""
    jsonschema.validate(obj, SCHEMAS[(obj["apiVersion"], obj["kind"])])
    kubernetes_validate.validate(split_pod(obj), k8s_version, strict=True)
