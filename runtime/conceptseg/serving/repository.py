"""Generate the Triton model repository for a profile from the templates beside this file.

    python -m conceptseg.serving.repository --profile cpu --engines engines/tiny --out /tmp/repo
    python -m conceptseg.serving.repository --profile gpu --engines engines/real-3b \
        --plans engines/real-3b/trt-fp16 --out /tmp/repo-gpu

Templates are ``config.pbtxt`` files with ``${key}`` slots. :func:`fill` refuses a template with
an unfilled slot or a value for a slot that does not exist, so a typo fails here, not in Triton.
Engine models (``sam3_vision``, ``sam3_text``, ``sam3_heads``, ``ctm``) take their tensor names,
dtypes and dims from the engine manifests (``<graph>.json``; ``<graph>.plan.json`` on gpu), the
same names every step uses. :func:`validate_repository` parses every generated config with
Triton's own ``ModelConfig`` proto and checks it against the manifests and the request contract.

Profiles: ``cpu`` runs the engines as Python models over OpenVINO (``engine_runtime``, the
default) or ONNX Runtime and the MLLM as a Python model (transformers, ort-genai); ``gpu`` runs
them as ``tensorrt_plan`` models and the MLLM through the TensorRT-LLM LLM API. The
orchestrator ``conceptseg`` (Python, BLS) is the same for both.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from conceptseg import contract
from conceptseg.build import (
    CPU_ENGINE_RUNTIMES,
    MLLM_BACKENDS,
    MLLM_PRECISION_HELP,
    MLLM_PRECISIONS,
    SERVE_CPU_SAM3_PRECISIONS,
)
from conceptseg.models.engines import vision_graph

# the templates: package data of ``conceptseg_triton`` (triton_repo/conceptseg_triton/), found by
# name so this module imports nothing of that package
HERE = Path(str(resources.files("conceptseg_triton")))
PROFILES = ("cpu", "gpu")
ENGINE_MODELS = ("sam3_vision", "sam3_text", "sam3_heads", "ctm")
MODELS = ("conceptseg", "conceptseg_stream", "mllm", *ENGINE_MODELS)
# the streaming orchestrator is the same Python model (it checks its config for "decoupled")
MODEL_PY = {"conceptseg_stream": HERE / "conceptseg" / "1" / "model.py"}
_SLOT = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_DTYPES = {
    "float32": "TYPE_FP32",
    "int64": "TYPE_INT64",
    "float16": "TYPE_FP16",
    "int32": "TYPE_INT32",
}
_TRT_DTYPES = {"FLOAT": "float32", "INT64": "int64", "HALF": "float16", "INT32": "int32"}


class TemplateError(ValueError):
    """A template and its values do not match, or a generated config disagrees with a manifest."""


def fill(template: str, values: Mapping[str, Any], *, source: str = "template") -> str:
    """``template`` with every ``${key}`` replaced; every slot needs a value and every value a slot."""
    slots = set(_SLOT.findall(template))
    missing, unused = sorted(slots - set(values)), sorted(set(values) - slots)
    if missing or unused:
        raise TemplateError(f"{source}: no value for {missing}; no slot for {unused}")
    text = _SLOT.sub(lambda m: str(values[m.group(1)]), template)
    if "${" in text:
        raise TemplateError(
            f"{source}: a value itself contains '${{': {text[text.index('${') :][:60]!r}"
        )
    return text


def pbtxt_string(value: str) -> str:
    """``value`` escaped for a double-quoted protobuf text string."""
    return value.replace("\\", "\\\\").replace('"', '\\"')


@dataclass(kw_only=True)
class RepoOptions:
    """Knobs of the generated repository (``conceptseg serve`` fills them from its flags)."""

    orchestrator_instances: int = (
        2  # BLS model instances (each runs a batch's requests concurrently)
    )
    max_batch_size: int = 8  # engines and orchestrator; gpu engines: capped by the plan profile
    queue_delay_us: int = 2000  # dynamic batcher's wait for more requests
    engine_threads: int = 0  # ONNX Runtime intra-op threads per cpu engine model (0: all cores)
    pipeline_config: dict[str, Any] = field(default_factory=dict)  # PipelineConfig fields
    mllm_backend: str = ""  # "hf" | "ort-genai" | "trtllm"; default: hf on cpu, trtllm on gpu
    mllm_precision: str = "fp32"  # hf: fp32 | bf16 | int4 | int8; ort-genai: ENGINES/mllm/<precision>
    mllm_path: Path | None = None  # default: manifest "mllm" (hf), ENGINES/mllm/<precision>
    # (ort-genai), the one ENGINES/trtllm-* checkpoint (trtllm)
    prefix_cache: int = 4  # hf: KV of the last N reference mosaics reused
    # concurrency (README "Serving"): generations the mllm model runs at once (0: its backend's
    # default, serving.mllm_model.DEFAULT_SLOTS; hf: always 1) and how many wait behind them
    mllm_slots: int = 0
    mllm_queue: int = 8
    mllm_prefill_chunk: int = 256  # ort-genai: prompt tokens per prefill unit (scheduler turn)
    # per orchestrator instance: requests in flight, of which at most max_reasoning in the MLLM
    # step (the rest serve router probes and fast paths); Triton's queue in front of them
    max_requests: int = 12
    max_reasoning: int = 8
    max_queue_size: int = 64
    queue_timeout_us: int = 30_000_000
    # cpu: "bf16" -> the sam3_vision model runs sam3_vision.onnx in bf16 under OpenVINO; "int8"
    # -> sam3_vision.int8.onnx under ONNX Runtime; "fp32": sam3_vision.onnx on engine_runtime
    sam3_precision: str = "fp32"
    engine_runtime: str = "openvino"  # cpu: what runs the engine models (CPU_ENGINE_RUNTIMES)


# --- engine models: I/O from the manifests ------------------------------------------------------


def _dims(shape: list[int | str], graph: str, name: str) -> list[int]:
    if not shape or shape[0] != "batch":
        raise TemplateError(f"{graph}.{name}: first dim {shape[:1]} is not the batch dim 'batch'")
    return [-1 if isinstance(d, str) else int(d) for d in shape[1:]]


def _message_text(message: Any, indent: int) -> str:
    """One ``{ ... }`` list entry of a config, printed by protobuf's own text format."""
    body = text_format.MessageToString(message, as_one_line=True)
    return " " * indent + "{ " + body + " }"


def _io_block(tensors: list[dict[str, Any]], graph: str) -> str:
    """``input``/``output`` entries as ``ModelInput`` / ``ModelOutput`` messages (same fields)."""
    items = []
    for t in tensors:
        if t["dtype"] not in _DTYPES:
            raise TemplateError(f"{graph}.{t['name']}: dtype {t['dtype']} has no Triton type here")
        io = model_config_pb2.ModelInput(
            name=t["name"],
            data_type=model_config_pb2.DataType.Value(_DTYPES[t["dtype"]]),
            dims=_dims(t["shape"], graph, t["name"]),
        )
        items.append(_message_text(io, 2))
    return ",\n".join(items)


def _warmup_block(manifest: dict[str, Any], graph: str, sizes: dict[str, int]) -> str:
    """One batch-1 warm-up request of zeros; dynamic dims take ``sizes`` (the smallest bucket)."""
    warmup = model_config_pb2.ModelWarmup(name="zeros_batch1", batch_size=1)
    for t in manifest["inputs"]:
        dims = []
        for d in t["shape"][1:]:
            if isinstance(d, str) and d not in sizes:
                raise TemplateError(f"{graph}.{t['name']}: no warm-up size for dynamic dim {d!r}")
            dims.append(sizes[d] if isinstance(d, str) else int(d))
        entry = warmup.inputs[t["name"]]
        entry.data_type = model_config_pb2.DataType.Value(_DTYPES[t["dtype"]])
        entry.dims.extend(dims)
        entry.zero_data = True
    return _message_text(warmup, 2)


def read_json(path: Path, hint: str) -> dict[str, Any]:
    if not path.exists():
        raise TemplateError(f"{path} is missing; {hint}")
    return json.loads(path.read_text())


def _throughput(plan: dict[str, Any], graph: str) -> tuple[int, int]:
    """(index, max batch) of the plan's ``throughput`` profile (the one that batches)."""
    for profile in plan["profiles"]:
        if profile["name"] == "throughput":
            first = next(iter(profile["shapes"].values()))
            return int(profile["index"]), int(first["max"][0])
    raise TemplateError(f"{graph}.plan.json has no 'throughput' profile; rebuild the plan")


def engine_values(
    graph: str, engines: Path, profile: str, opts: RepoOptions, plans: Path | None
) -> dict[str, Any]:
    manifest = read_json(engines / f"{graph}.json", "export it with `conceptseg export`")
    top = read_json(engines / "manifest.json", "export with `conceptseg export`")
    sizes = {"seq": int(top["ctm_buckets"][0]), "num_boxes": 1}
    values = {
        "name": graph,
        "max_batch_size": opts.max_batch_size,
        "queue_delay_us": opts.queue_delay_us,
        "inputs": _io_block(manifest["inputs"], graph),
        "outputs": _io_block(manifest["outputs"], graph),
        "warmup": _warmup_block(manifest, graph, sizes),
    }
    if profile == "cpu":
        if opts.engine_runtime not in CPU_ENGINE_RUNTIMES:
            raise TemplateError(
                f"engine runtime {opts.engine_runtime!r}: choose one of {CPU_ENGINE_RUNTIMES}"
            )
        graph_file, runtime, precision = graph, opts.engine_runtime, "fp32"
        if graph == "sam3_vision" and opts.sam3_precision == "bf16":
            runtime, precision = "openvino", "bf16"
        elif graph == "sam3_vision" and opts.sam3_precision != "fp32":
            graph_file = _int8_vision(engines, opts.sam3_precision, manifest)
            runtime = "onnxruntime"  # its int8 operators are ONNX Runtime's quantization
        return values | {
            "engines": pbtxt_string(str(engines)),
            "threads": opts.engine_threads,
            "graph": graph_file,
            "runtime": runtime,
            "precision": precision,
        }
    if opts.sam3_precision != "fp32":
        raise TemplateError(
            f"sam3 precision {opts.sam3_precision!r} is for the cpu profile; TensorRT plans take "
            "theirs from `conceptseg build-engines --precision/--fp8`"
        )
    plan = read_json(
        (plans or engines) / f"{graph}.plan.json", "build it with `conceptseg build-engines`"
    )
    index, max_batch = _throughput(plan, graph)
    return values | {"max_batch_size": min(opts.max_batch_size, max_batch), "profile_index": index}


def _int8_vision(engines: Path, precision: str, fp32: dict[str, Any]) -> str:
    """The int8 image encoder's file stem, checked: exported, and the same tensors as fp32."""

    if precision != "int8":
        raise TemplateError(f"sam3 precision {precision!r}: choose one of {SERVE_CPU_SAM3_PRECISIONS}")
    stem = vision_graph(precision)
    int8 = read_json(
        engines / f"{stem}.json",
        "make it with `conceptseg export --parts sam3_vision_int8` (same --out)",
    )
    if (int8["inputs"], int8["outputs"]) != (fp32["inputs"], fp32["outputs"]):
        raise TemplateError(f"{stem}.json: inputs/outputs differ from sam3_vision.json")
    return stem


# --- the repository -----------------------------------------------------------------------------


def mllm_source(
    profile: str, engines: Path, opts: RepoOptions, top: dict[str, Any]
) -> tuple[str, Path]:
    """(backend, directory) the ``mllm`` model loads, checked to exist."""

    backend = opts.mllm_backend or ("hf" if profile == "cpu" else "trtllm")
    if backend not in MLLM_BACKENDS:
        raise TemplateError(f"mllm backend {backend!r}: choose one of {MLLM_BACKENDS}")
    if opts.mllm_precision not in MLLM_PRECISIONS[backend]:
        raise TemplateError(
            f"mllm precision {opts.mllm_precision!r}: {backend} takes {MLLM_PRECISIONS[backend]}"
        )
    if opts.mllm_path is not None:
        path = Path(opts.mllm_path).resolve()
    elif backend == "hf":
        path = Path(top["mllm"])
    elif backend == "ort-genai":
        path = engines / "mllm" / opts.mllm_precision
    else:
        found = sorted(p for p in engines.glob("trtllm-*") if p.is_dir())
        if len(found) != 1:
            raise TemplateError(
                f"{engines} has {len(found)} trtllm-* checkpoints; quantize one with "
                "`python -m conceptseg_export.trtllm_quantize` or give the mllm path"
            )
        path = found[0]
    if not path.is_dir():
        hint = {
            "hf": "the manifest's checkpoint moved?",
            "ort-genai": "export it with `conceptseg export --parts mllm`",
            "trtllm": "quantize it first",
        }[backend]
        raise TemplateError(f"mllm ({backend}): {path} is not a directory; {hint}")
    return backend, path


def model_values(
    profile: str, engines: Path, opts: RepoOptions, plans: Path | None = None
) -> dict[str, tuple[Path, dict[str, Any]]]:
    """Model name -> (template file, values) for ``profile``."""
    if profile not in PROFILES:
        raise TemplateError(f"profile {profile!r}: choose one of {PROFILES}")
    top = read_json(engines / "manifest.json", "export with `conceptseg export`")
    config = pbtxt_string(json.dumps(opts.pipeline_config, sort_keys=True))
    backend, mllm_path = mllm_source(profile, engines, opts, top)
    orchestrator = {
        "max_batch_size": opts.max_batch_size,
        "queue_delay_us": opts.queue_delay_us,
        "instances": opts.orchestrator_instances,
        "max_requests": opts.max_requests,
        "max_reasoning": opts.max_reasoning,
        "max_queue_size": opts.max_queue_size,
        "queue_timeout_us": opts.queue_timeout_us,
        "engines": pbtxt_string(str(engines)),
        "profile": profile,
        "pipeline_config": config,
    }
    models: dict[str, tuple[Path, dict[str, Any]]] = {
        "conceptseg": (HERE / "conceptseg" / "config.pbtxt", orchestrator),
        "conceptseg_stream": (HERE / "conceptseg_stream" / "config.pbtxt", orchestrator),
        "mllm": (
            HERE / "mllm" / "config.pbtxt",
            {
                "hidden_size": int(top["hidden_size"]),
                "instance_kind": "KIND_CPU" if profile == "cpu" else "KIND_MODEL",
                "mllm_backend": backend,
                "mllm_path": pbtxt_string(str(mllm_path)),
                "mllm_precision": opts.mllm_precision,
                "prefix_cache": opts.prefix_cache,
                "max_generations": opts.mllm_slots,
                "max_queued": opts.mllm_queue,
                "prefill_chunk": opts.mllm_prefill_chunk,
                "pipeline_config": config,
            },
        ),
    }
    for graph in ENGINE_MODELS:
        template = HERE / "engine" / f"config.{profile}.pbtxt"
        models[graph] = (template, engine_values(graph, engines, profile, opts, plans))
    return models


def build_repository(
    profile: str,
    engines: Path,
    out: Path,
    opts: RepoOptions | None = None,
    plans: Path | None = None,
) -> Path:
    """Write ``out/<model>/config.pbtxt`` and ``out/<model>/1/`` for every model of ``profile``."""
    opts, engines, out = opts or RepoOptions(), Path(engines).resolve(), Path(out)
    plans = Path(plans).resolve() if plans else None
    for name, (template, values) in model_values(profile, engines, opts, plans).items():
        text = fill(template.read_text(), values, source=str(template.relative_to(HERE)))
        version = out / name / "1"
        version.mkdir(parents=True, exist_ok=True)
        (out / name / "config.pbtxt").write_text(text)
        if name in ENGINE_MODELS and profile == "gpu":
            plan = (plans or engines) / f"{name}.plan"
            target = version / "model.plan"
            target.unlink(missing_ok=True)
            target.symlink_to(plan)  # dangling until the plan is built: validate says so
        else:
            shutil.copyfile(
                MODEL_PY.get(name, template.parent / "1" / "model.py"), version / "model.py"
            )
    return out


# --- validation ---------------------------------------------------------------------------------


def parse_config(path: Path) -> Any:
    """``config.pbtxt`` parsed into Triton's ``ModelConfig`` proto (unknown fields fail)."""

    try:
        return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
    except text_format.ParseError as exc:
        raise TemplateError(f"{path}: {exc}") from None


def _tensor_table(tensors: Any) -> dict[str, tuple[str, list[int]]]:

    return {t.name: (model_config_pb2.DataType.Name(t.data_type), list(t.dims)) for t in tensors}


def _expected(tensors: list[dict[str, Any]], graph: str) -> dict[str, tuple[str, list[int]]]:
    return {t["name"]: (_DTYPES[t["dtype"]], _dims(t["shape"], graph, t["name"])) for t in tensors}


def _check_plan(graph: str, manifest: dict[str, Any], plan: dict[str, Any]) -> list[str]:
    problems = []
    for kind in ("inputs", "outputs"):
        want = {
            t["name"]: ([-1 if isinstance(d, str) else d for d in t["shape"]], t["dtype"])
            for t in manifest[kind]
        }
        got = {t["name"]: (t["shape"], _TRT_DTYPES.get(t["dtype"], t["dtype"])) for t in plan[kind]}
        if want != got:
            problems.append(f"{graph}: plan {kind} {got} != ONNX manifest {want}")
    return problems


def validate_repository(
    repo: Path, engines: Path, profile: str, plans: Path | None = None
) -> list[str]:
    """Problems found (empty: the repository agrees with the manifests and the contract)."""

    repo, engines = Path(repo), Path(engines)
    problems = []
    top = read_json(engines / "manifest.json", "export with `conceptseg export`")
    configs = {p.parent.name: parse_config(p) for p in sorted(repo.glob("*/config.pbtxt"))}
    if sorted(configs) != sorted(MODELS):
        problems.append(f"models {sorted(configs)} != {sorted(MODELS)}")
    for name in ENGINE_MODELS:
        cfg = configs.get(name)
        if cfg is None:
            continue
        manifest = read_json(engines / f"{name}.json", "export it")
        for kind, tensors in (("inputs", cfg.input), ("outputs", cfg.output)):
            got, want = _tensor_table(tensors), _expected(manifest[kind], name)
            if got != want:
                problems.append(f"{name}: config {kind} {got} != manifest {want}")
        if profile == "gpu":
            plan = read_json((plans or engines) / f"{name}.plan.json", "build it")
            problems += _check_plan(name, manifest, plan)
            index, max_batch = _throughput(plan, name)
            if cfg.platform != "tensorrt_plan" or cfg.max_batch_size > max_batch:
                problems.append(
                    f"{name}: platform {cfg.platform!r}, max_batch_size {cfg.max_batch_size} > plan's {max_batch}"
                )
            if list(cfg.instance_group[0].profile) != [str(index)]:
                problems.append(
                    f"{name}: instance profile {list(cfg.instance_group[0].profile)} != [{index}]"
                )
            if not (repo / name / "1" / "model.plan").exists():
                problems.append(
                    f"{name}: 1/model.plan -> {(plans or engines) / (name + '.plan')} is missing"
                )
        elif cfg.backend != "python":
            problems.append(f"{name}: backend {cfg.backend!r} != 'python' on cpu")
        else:
            graph = cfg.parameters["graph"].string_value
            allowed = (name, vision_graph("int8")) if name == "sam3_vision" else (name,)
            if graph not in allowed:
                problems.append(f"{name}: graph {graph!r} is not one of {allowed}")
            elif not (engines / f"{graph}.onnx").exists():
                problems.append(f"{name}: {engines / (graph + '.onnx')} is missing")
    for name, outputs, decoupled in (
        ("conceptseg", contract.OUTPUTS, False),
        (contract.STREAM_MODEL, contract.STREAM_OUTPUTS, True),
    ):
        if name not in configs:
            continue
        cfg = configs[name]
        for kind, tensors, specs in (
            ("inputs", cfg.input, contract.INPUTS),
            ("outputs", cfg.output, outputs),
        ):
            got = _tensor_table(tensors)
            want = {
                n: ("TYPE_STRING" if s.dtype == "BYTES" else f"TYPE_{s.dtype}", list(s.dims))
                for n, s in specs.items()
            }
            if got != want:
                problems.append(f"{name}: config {kind} {got} != contract {want}")
        if cfg.model_transaction_policy.decoupled != decoupled:
            problems.append(f"{name}: decoupled is {cfg.model_transaction_policy.decoupled}")
    if "mllm" in configs:
        hidden = _tensor_table(configs["mllm"].output).get("hidden")
        if hidden != ("TYPE_FP32", [-1, int(top["hidden_size"])]):
            problems.append(f"mllm: hidden {hidden} != (TYPE_FP32, [-1, {top['hidden_size']}])")
        if not configs["mllm"].model_transaction_policy.decoupled:
            problems.append("mllm: must be decoupled (the orchestrators stream from it)")
    return problems


def main(argv: list[str] | None = None) -> int:

    parser = argparse.ArgumentParser(prog="python -m conceptseg.serving.repository",
                                     description=__doc__.splitlines()[0])  # fmt: skip
    parser.add_argument("--profile", required=True, choices=PROFILES)
    parser.add_argument("--engines", required=True, type=Path, help="conceptseg export output")
    parser.add_argument("--plans", type=Path, default=None, help="gpu: TensorRT plans directory")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--mllm-backend", default="", choices=["", *MLLM_BACKENDS])
    parser.add_argument(
        "--mllm-precision",
        default="fp32",
        help=MLLM_PRECISION_HELP,
    )
    parser.add_argument("--mllm-path", type=Path, default=None)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--orchestrator-instances", type=int, default=2)
    args = parser.parse_args(argv)
    opts = RepoOptions(
        mllm_backend=args.mllm_backend,
        mllm_precision=args.mllm_precision,
        mllm_path=args.mllm_path,
        max_batch_size=args.max_batch_size,
        orchestrator_instances=args.orchestrator_instances,
    )
    try:
        out = build_repository(args.profile, args.engines, args.out, opts, args.plans)
        problems = validate_repository(out, args.engines, args.profile, args.plans)
    except TemplateError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for problem in problems:
        print(f"problem: {problem}", file=sys.stderr)
    print(f"wrote {args.profile} repository to {out}" + (" (with problems)" if problems else ""))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
