"""``conceptseg build-engines``: TensorRT plans from exported ONNX graphs, checked against ORT.

Writes ``OUT/<graph>.plan`` + ``OUT/<graph>.plan.json`` (I/O names, shapes and dtypes, profiles,
precision, the TensorRT that built it, GPU, build time, sha256 of the ONNX and of its external
weights, verification) per graph, reusing one timing cache (loaded if present, saved after every
build). A plan loads only in the TensorRT that built it: the build refuses any TensorRT but the
deployment container's (``gpu_stack.toml``) unless ``--any-tensorrt``, and ``serve --profile gpu``
refuses plans recorded with another. Verification runs the export's sample inputs and each
profile's opt shapes with random inputs through the plan and through ONNX Runtime (CPU) on the
fp32 source graph, and judges the error statistics against ``trt_verify.LIMITS``.

Contract with the exporter (``conceptseg export``): ``engines/NAME/<graph>.onnx`` (fp32) beside
``<graph>.json`` = ``{"inputs"|"outputs": [{"name", "shape", "dtype"}], "opset"}`` where a string in
``shape`` names a dynamic dimension ("batch", "seq"). Profiles come from those names and the rule
table ``DIM_RULES`` below (data: edit it, not the code):

- ``latency``: every dynamic dim at one exact value (min = opt = max); a dim with several
  latency values (the CTM's ``seq`` buckets 128/256/512/768) gives one profile per value,
  ``latency_seq128`` ... The runtime pads to a bucket, so each call hits an exact-shape profile.
- ``throughput``: one profile with ranges (batch 1..8, opt 4; seq 128..``CTM_MAX_SEQ``, opt 256:
  beyond 768 the runtime pads to multiples of 768, up to the bucket of the longest completion).

Precision: networks are strongly typed (``NetworkDefinitionCreationFlag.STRONGLY_TYPED``: weak
typing is deprecated in TensorRT 10 and gone in 11), so the ONNX's own types give it: ``fp32``
builds the ONNX as is, with TF32 off; ``fp16``/``bf16`` first convert the graph with NVIDIA
ModelOpt AutoCast (``--keep_io_types``: inputs and outputs stay fp32; calibrated on the export's
``<graph>.sample.npz``), in the interpreter given by ``--autocast-python``; ``--fp8`` needs FP8
Q/DQ nodes already in the ONNX (explicit quantization, e.g. ModelOpt
``modelopt.onnx.quantization --quantize_mode fp8``) and builds it as is: the other ops stay
fp32, and the record says ``fp8+fp32``.

    conceptseg build-engines --onnx engines/tiny --precision fp16
    python -m conceptseg_export.trt_build --onnx engines/tiny --no-verify
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import logging
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from conceptseg import cli_args, gpu_stack
from conceptseg.backends.trt import TENSORRT_PIN, TensorRTUnavailable, import_tensorrt
from conceptseg.config import PipelineConfig
from conceptseg.models.engines import CTM_BUCKETS, bucket  # the runtime pads states to these
from conceptseg.types import UsageError
from conceptseg_export.op_check import tensorrt_graphs
from conceptseg_export.trt_verify import LIMITS, check_against_onnxruntime

log = logging.getLogger(__name__)

# nvidia-modelopt[onnx], for AutoCast (fp16/bf16) and FP8 quantization: the container's own
MODELOPT_REQUIREMENT = gpu_stack.load().requirement("modelopt")
PRECISIONS = ("fp32", "fp16", "bf16")
# the longest CTM sequence the runtime sends: the bucket of the longest possible completion
CTM_MAX_SEQ = bucket(PipelineConfig().max_length, CTM_BUCKETS)


@dataclass(frozen=True)
class DimRule:
    """Profile values of one dynamic dimension: ``latency`` exact values (one latency profile
    each), ``throughput`` the (min, opt, max) of the single throughput profile."""

    latency: tuple[int, ...]
    throughput: tuple[int, int, int]


# (graph, dimension name) -> rule; graph "*" matches every graph; the graph's own entry wins.
DIM_RULES: dict[tuple[str, str], DimRule] = {
    ("*", "batch"): DimRule(latency=(1,), throughput=(1, 4, 8)),
    # max_new_tokens <= max_length; beyond the last bucket lengths pad to its multiples
    ("ctm", "seq"): DimRule(latency=CTM_BUCKETS, throughput=(128, 256, CTM_MAX_SEQ)),
    # the runtime always sends exactly one padding box (label -10, METHOD.md section 6)
    ("sam3_heads", "num_boxes"): DimRule(latency=(1,), throughput=(1, 1, 1)),
}
Shape = tuple[int, ...]


class BuildError(UsageError):
    """The build cannot go on; the message names the graph or option and how to fix it."""


@dataclass(frozen=True)
class Profile:
    """A named optimisation profile: input name -> (min, opt, max) shapes."""

    name: str
    shapes: dict[str, tuple[Shape, Shape, Shape]]

    def to_json(self) -> dict[str, Any]:
        keys = ("min", "opt", "max")
        shapes = {n: dict(zip(keys, map(list, s), strict=True)) for n, s in self.shapes.items()}
        return {"name": self.name, "shapes": shapes}


@dataclass(kw_only=True)
class BuildConfig:
    """What to build, how, and where (one ``--flag`` per field)."""

    onnx: Path = field(metadata={"help": "engines/NAME: <graph>.onnx + <graph>.json"})
    precision: str = field(default="fp32", metadata={"help": "precision", "choices": PRECISIONS})
    fp8: bool = field(default=False, metadata={"help": "graphs carry FP8 Q/DQ nodes"})
    out: Path | None = field(default=None, metadata={"help": "default: ONNX/trt-PRECISION"})
    workspace_gb: float = field(default=8.0, metadata={"help": "builder workspace, GiB"})
    timing_cache: Path | None = field(default=None, metadata={"help": "default: ONNX/timing.cache"})
    verify: bool = field(default=True, metadata={"help": "compare with ONNX Runtime (CPU)"})
    graphs: tuple[str, ...] = field(default=(), metadata={"help": "default: every *.onnx"})
    autocast_python: Path | None = field(
        default=None, metadata={"help": "python with nvidia-modelopt[onnx] (fp16/bf16)"}
    )
    verbose: bool = field(default=False, metadata={"help": "TensorRT verbose log"})
    any_tensorrt: bool = field(
        default=False,
        metadata={"help": "build with the installed TensorRT even if it is not the container's "
                  "(e.g. on Jetson); serve --profile gpu refuses such plans"},
    )  # fmt: skip

    def __post_init__(self) -> None:
        self.onnx = Path(self.onnx)
        if self.precision not in PRECISIONS:
            raise BuildError("--precision", f"{self.precision!r} is not one of {PRECISIONS}")
        if self.fp8 and self.precision != "fp32":
            raise BuildError(
                "--fp8",
                f"--fp8 builds the Q/DQ graph as is: its other ops stay fp32, not "
                f"{self.precision}. Use --fp8 alone (recorded as fp8+fp32)",
            )
        if self.workspace_gb <= 0:
            raise BuildError("--workspace-gb", f"must be > 0, got {self.workspace_gb}")
        tag = self.precision + ("-fp8" if self.fp8 else "")
        self.out = Path(self.out or self.onnx / f"trt-{tag}")
        self.timing_cache = Path(self.timing_cache or self.onnx / "timing.cache")
        self.graphs = tuple(self.graphs)

    @property
    def label(self) -> str:
        """What the plan computes in: ``fp8+fp32`` for Q/DQ graphs (the rest stays fp32)."""
        return "fp8+fp32" if self.fp8 else self.precision

    @property
    def limits(self) -> Any:
        return LIMITS["fp8" if self.fp8 else self.precision]


# --- command line: generated from the dataclass fields -------------------------------------------


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    cli_args.add_cli_args(parser, BuildConfig)


def from_cli_args(args: argparse.Namespace) -> BuildConfig:
    return cli_args.from_cli_args(args, BuildConfig)


def cmd_build_engines(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    out = main(from_cli_args(args))
    print(f"wrote TensorRT plans and manifests to {out}")


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``build-engines`` subcommand to a ``conceptseg`` CLI's subparsers."""
    p = subparsers.add_parser(
        "build-engines", help="build and verify TensorRT plans from engines/NAME"
    )
    add_cli_args(p)
    p.set_defaults(func=cmd_build_engines)
    return p


# --- pure parts: graph manifests and profiles ----------------------------------------------------


def read_graph_manifest(onnx_path: Path) -> dict[str, Any]:
    """``<graph>.json`` beside ``<graph>.onnx``, checked for the keys this module reads."""
    path = onnx_path.with_suffix(".json")
    if not path.is_file():
        raise BuildError(
            onnx_path.name, f"no manifest {path.name} beside it; re-run `conceptseg export`"
        )
    manifest = json.loads(path.read_text())
    for key in ("inputs", "outputs"):
        if not all({"name", "shape", "dtype"} <= set(t) for t in manifest.get(key, [None])):
            raise BuildError(path.name, f"'{key}' must list {{name, shape, dtype}} entries")
    return manifest


def dim_rules(graph: str, manifest: dict[str, Any], rules=DIM_RULES) -> dict[str, DimRule]:
    """Dynamic dimension name -> its rule, for every dynamic dim of the graph's inputs."""
    found = {}
    for spec in manifest["inputs"]:
        for axis, dim in enumerate(spec["shape"]):
            if isinstance(dim, int):
                continue
            rule = rules.get((graph, str(dim))) or rules.get(("*", str(dim)))
            if rule is None:
                raise BuildError(
                    graph,
                    f"input {spec['name']!r} axis {axis} is dynamic ({dim!r}) "
                    "with no profile rule; add one to DIM_RULES in conceptseg_export/trt_build.py",
                )
            found[str(dim)] = rule
    return found


def _concrete(shape: list[int | str], values: dict[str, int]) -> Shape:
    return tuple(d if isinstance(d, int) else values[str(d)] for d in shape)


def profiles_for(graph: str, manifest: dict[str, Any], rules=DIM_RULES) -> list[Profile]:
    """Latency profiles (one per combination of latency values) then the throughput profile.
    Empty when every input is static (TensorRT then needs no profile)."""
    dims = dim_rules(graph, manifest, rules)
    if not dims:
        return []
    names = sorted(dims)
    profiles = []
    for combo in itertools.product(*(dims[n].latency for n in names)):
        values = dict(zip(names, combo, strict=True))
        tag = "_".join(f"{n}{v}" for n, v in values.items() if len(dims[n].latency) > 1)
        shapes = {s["name"]: (_concrete(s["shape"], values),) * 3 for s in manifest["inputs"]}
        profiles.append(Profile("latency" + (f"_{tag}" if tag else ""), shapes))
    lo, opt, hi = ({n: dims[n].throughput[i] for n in names} for i in range(3))
    shapes = {
        s["name"]: tuple(_concrete(s["shape"], v) for v in (lo, opt, hi))
        for s in manifest["inputs"]
    }
    return [*profiles, Profile("throughput", shapes)]


FP8_TYPES = {17, 18, 19, 20}  # onnx.TensorProto.FLOAT8E4M3FN/E4M3FNUZ/E5M2/E5M2FNUZ


def has_fp8_qdq(model: Any) -> bool:
    """Whether a ModelProto quantizes to an FP8 type with QuantizeLinear/DequantizeLinear."""
    nodes = list(model.graph.node)
    if not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in nodes):
        return False
    tensors = list(model.graph.initializer) + [
        a.t for n in nodes for a in n.attribute if a.HasField("t")
    ]
    dtypes = {a.i for n in nodes for a in n.attribute if a.name == "output_dtype"}
    return bool(FP8_TYPES & ({t.data_type for t in tensors} | dtypes))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def _graph_paths(cfg: BuildConfig) -> list[Path]:
    if not cfg.onnx.is_dir():
        raise BuildError(
            "--onnx", f"{cfg.onnx} is not a directory; give engines/NAME from `conceptseg export`"
        )
    paths = tensorrt_graphs(cfg.onnx)  # not the ONNX Runtime-only *.int8.onnx
    if cfg.graphs:
        unknown = sorted(set(cfg.graphs) - {p.stem for p in paths})
        if unknown:
            raise BuildError("--graphs", f"{unknown} not in {cfg.onnx} ({[p.stem for p in paths]})")
        paths = [p for p in paths if p.stem in cfg.graphs]
    if not paths:
        raise BuildError("--onnx", f"{cfg.onnx} has no *.onnx graphs")
    return paths


# --- TensorRT: parse, build, verify ---------------------------------------------------------------


def to_strongly_typed_source(src: Path, cfg: BuildConfig) -> Path:
    """The ONNX whose own types give the engine's precision (strongly typed networks).

    fp16/bf16 run ModelOpt AutoCast's CLI in ``cfg.autocast_python``: a separate interpreter,
    because ``nvidia-modelopt[onnx]`` pins onnx and onnxruntime-gpu versions this project does
    not use. Inputs and outputs stay fp32 (``--keep_io_types``), so callers feed the same arrays.
    """
    if cfg.fp8 or cfg.precision == "fp32":
        return src  # fp8: checked for FP8 Q/DQ in main(); fp32: as exported
    dst = cfg.out / f"{src.stem}.{cfg.precision}.onnx"
    calibration = sample_inputs(src)
    command = [
        str(cfg.autocast_python or sys.executable),
        "-m",
        "modelopt.onnx.autocast",
        "--onnx_path",
        str(src),
        "--output_path",
        str(dst),
        "--low_precision_type",
        cfg.precision,
        "--keep_io_types",
        # which nodes stay fp32 is decided on these (None would mean random ids, masks, boxes)
        "--calibration_data",
        str(calibration),
    ]
    log.info("%s: AutoCast fp32 -> %s: %s", src.name, cfg.precision, shlex.join(command))
    run = subprocess.run(command, capture_output=True, text=True)
    if run.returncode == 0 and dst.is_file():
        return dst
    if "No module named 'modelopt" in run.stderr:
        raise BuildError(
            "--autocast-python",
            f"{command[0]} has no ModelOpt. Make one: python -m venv "
            f".venv-modelopt && .venv-modelopt/bin/pip install '{MODELOPT_REQUIREMENT}'"
            ", then pass --autocast-python .venv-modelopt/bin/python (the image has it)",
        )
    tail = "\n".join(run.stderr.strip().splitlines()[-5:])
    raise BuildError(
        src.name, f"AutoCast to {cfg.precision} failed (exit {run.returncode}):\n{tail}"
    )


def sample_inputs(onnx_path: Path) -> Path:
    """``<graph>.sample.npz``: the export's own inputs, keyed by ONNX input name."""
    path = onnx_path.with_suffix(".sample.npz")
    if not path.is_file():
        raise BuildError(
            onnx_path.name,
            f"no {path.name} beside it (AutoCast's calibration and the verification inputs); "
            "re-run `conceptseg export`",
        )
    return path


def graph_hashes(onnx_path: Path) -> dict[str, str]:
    """sha256 of ``<graph>.onnx`` and of its external weights ``<graph>.onnx.data``, if any."""
    files = [onnx_path, Path(str(onnx_path) + ".data")]
    return {p.name: _sha256(p) for p in files if p.is_file()}


def _parse(trt: Any, network: Any, logger: Any, onnx_path: Path) -> None:
    """Parse into ``network``; on failure log every parser error and raise BuildError."""
    parser = trt.OnnxParser(network, logger)
    if parser.parse_from_file(str(onnx_path)):  # from file: external weights resolve beside it
        return
    errors = [_describe(parser.get_error(i)) for i in range(parser.num_errors)]
    for i, error in enumerate(errors, 1):
        log.error("%s: parser error %d/%d at %s", onnx_path.name, i, len(errors), error)
    raise BuildError(
        onnx_path.name,
        f"TensorRT {trt.__version__}'s ONNX parser failed ({len(errors)} errors logged; first at "
        f"{errors[0] if errors else '?'}); pre-check the ops with "
        f"`python -m conceptseg_export.op_check {onnx_path.parent}`",
    )


def _describe(error: Any) -> str:
    """One parser error: node index, name, op, local-function stack, description, code."""
    stack = error.local_function_stack() if error.local_function_stack_size() else []
    where = f" in {' -> '.join(stack)}" if stack else ""
    return (
        f"node {error.node()} {error.node_name()!r} (op {error.node_operator()}){where}: "
        f"{error.desc()} [{error.code()}]"
    )


def _io(network: Any, graph: str) -> dict[str, list[dict[str, Any]]]:
    """Network inputs and outputs (name, shape with -1 for dynamic, dtype), logged."""
    tensors = {
        "inputs": [network.get_input(i) for i in range(network.num_inputs)],
        "outputs": [network.get_output(i) for i in range(network.num_outputs)],
    }
    for kind, items in tensors.items():
        for t in items:
            log.info("%s: %s %s %s %s", graph, kind[:-1], t.name, list(t.shape), t.dtype.name)
    return {
        kind: [{"name": t.name, "shape": list(t.shape), "dtype": t.dtype.name} for t in items]
        for kind, items in tensors.items()
    }


def _attach_timing_cache(config: Any, cache_bytes: bytes) -> None:
    cache = config.create_timing_cache(cache_bytes)
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        log.warning("timing cache was made on another GPU or TensorRT; starting a fresh one")
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)


def build_plan(
    trt: Any,
    cfg: BuildConfig,
    graph: str,
    onnx_path: Path,
    profiles: list[Profile],
    manifest: dict[str, Any],
    cache_bytes: bytes,
) -> tuple[bytes, dict[str, Any], bytes]:
    """Serialized plan, network I/O description and the updated timing cache."""
    logger = trt.Logger(trt.Logger.VERBOSE if cfg.verbose else trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # strongly typed: precision from the ONNX's types (TensorRT 10: the flag; 11: always, flag ignored)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    _parse(trt, network, logger, onnx_path)
    io = _io(network, graph)
    expected = {k: sorted(t["name"] for t in manifest[k]) for k in ("inputs", "outputs")}
    if {k: sorted(t["name"] for t in v) for k, v in io.items()} != expected:
        raise BuildError(
            graph, f"network I/O {io} does not match the manifest's {expected}; re-export"
        )
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(cfg.workspace_gb * (1 << 30)))
    if cfg.precision == "fp32" and not cfg.fp8:
        config.clear_flag(trt.BuilderFlag.TF32)  # true fp32, so the fp32 tolerance holds
    _attach_timing_cache(config, cache_bytes)
    dynamic = {t["name"] for t in io["inputs"] if -1 in t["shape"]}
    for index, profile in enumerate(profiles):
        trt_profile = builder.create_optimization_profile()
        try:
            for name, (lo, opt, hi) in profile.shapes.items():
                if name in dynamic:
                    trt_profile.set_shape(name, lo, opt, hi)
            added = config.add_optimization_profile(trt_profile)
        except RuntimeError as exc:  # the bindings raise on inconsistent min/opt/max
            raise BuildError(graph, f"profile {profile.name} {profile.shapes}: {exc}") from None
        if added != index:
            raise BuildError(graph, f"TensorRT rejected profile {profile.name} {profile.shapes}")
    log.info(
        "%s: building %s with profiles %s ...", graph, cfg.precision, [p.name for p in profiles]
    )
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise BuildError(
            graph,
            "build_serialized_network failed (TensorRT log above); try --verbose, "
            "a larger --workspace-gb, or fp32 if the GPU lacks bf16/fp8",
        )
    return bytes(memoryview(plan)), io, bytes(memoryview(config.get_timing_cache().serialize()))


def _gpu_name() -> str:
    import torch  # heavy: torch, only on this path

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "unknown"


def _plan_record(
    cfg: BuildConfig,
    graph: str,
    src: Path,
    built_from: Path,
    io: dict[str, Any],
    profiles: list[Profile],
    seconds: float,
    trt_version: str,
) -> dict[str, Any]:
    """The ``<graph>.plan.json`` manifest (verification filled in afterwards)."""
    return {
        "graph": graph,
        "plan": f"{graph}.plan",
        "precision": cfg.label,
        "fp8": cfg.fp8,
        "strongly_typed": True,
        "source_onnx": str(src),
        "source_onnx_sha256": _sha256(src),
        "source_sha256": graph_hashes(src),  # the graph and its external weights
        "built_from": str(built_from),  # the AutoCast graph for fp16/bf16, else the source
        "built_from_sha256": graph_hashes(built_from),
        **io,
        "profiles": [{"index": i, **p.to_json()} for i, p in enumerate(profiles)],
        "tensorrt_version": trt_version,
        "gpu": _gpu_name(),
        "build_seconds": round(seconds, 1),
        "built_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "workspace_gb": cfg.workspace_gb,
        "timing_cache": str(cfg.timing_cache),
        "verification": None,
    }


def _check_fp8(paths: list[Path]) -> None:

    import onnx  # lazy: 0.9 s of imports; `conceptseg --help` registers this module's flags

    plain = [p.name for p in paths if not has_fp8_qdq(onnx.load(str(p), load_external_data=False))]
    if plain:
        raise BuildError(
            "--fp8",
            f"{plain} have no FP8 QuantizeLinear/DequantizeLinear; strongly typed "
            "networks take FP8 only as explicit quantization. Quantize them with ModelOpt (its own venv: "
            f"pip install '{MODELOPT_REQUIREMENT}'; python -m "
            "modelopt.onnx.quantization --quantize_mode fp8 ...) into a copy of the directory",
        )


def main(cfg: BuildConfig) -> Path:
    """Build (and verify) one plan per graph of ``cfg.onnx`` into ``cfg.out``; returns ``cfg.out``.

    Raises BuildError naming the graph or option on any failure; a verification failure is
    raised after every plan and manifest is written.
    """
    # 1) read the contract and work out the profiles: fails before any GPU work
    paths = _graph_paths(cfg)
    graphs = {p.stem: (p, read_graph_manifest(p)) for p in paths}
    profiles = {g: profiles_for(g, m) for g, (_, m) in graphs.items()}
    if cfg.fp8:
        _check_fp8(paths)
    # 2) TensorRT, the output directory and the timing cache
    try:
        trt = import_tensorrt()
    except TensorRTUnavailable as exc:
        raise BuildError("tensorrt", str(exc)) from None
    if trt.__version__ != TENSORRT_PIN:
        if not cfg.any_tensorrt:
            raise BuildError(
                "tensorrt",
                f"installed TensorRT {trt.__version__} is not the deployment container's "
                f"{TENSORRT_PIN}: its plans would not load there. Build in the image "
                f"({gpu_stack.load().image}) or pass --any-tensorrt",
            )
        log.warning("tensorrt %s is not the container's %s", trt.__version__, TENSORRT_PIN)
    cfg.out.mkdir(parents=True, exist_ok=True)
    cache = cfg.timing_cache.read_bytes() if cfg.timing_cache.is_file() else b""
    log.info("timing cache: %s (%s)", cfg.timing_cache, "loaded" if cache else "new")
    failed = []
    for graph, (src, manifest) in graphs.items():
        # 3) precision into the graph's types, then parse + build; keep the cache after each build
        built_from = to_strongly_typed_source(src, cfg)
        start = time.perf_counter()
        plan, io, cache = build_plan(trt, cfg, graph, built_from, profiles[graph], manifest, cache)
        seconds = time.perf_counter() - start
        cfg.timing_cache.parent.mkdir(parents=True, exist_ok=True)
        cfg.timing_cache.write_bytes(cache)
        (cfg.out / f"{graph}.plan").write_bytes(plan)
        log.info(
            "%s: %s/%s.plan (%.1f MB, %.0f s)", graph, cfg.out, graph, len(plan) / 1e6, seconds
        )
        # 4) the manifest, then verification against ONNX Runtime on the fp32 source graph
        record = _plan_record(
            cfg, graph, src, built_from, io, profiles[graph], seconds, trt.__version__
        )
        record_path = cfg.out / f"{graph}.plan.json"
        record_path.write_text(json.dumps(record, indent=2) + "\n")
        if cfg.verify:
            cases = [(p.name, {n: s[1] for n, s in p.shapes.items()}) for p in profiles[graph]]
            static = {t["name"]: t["shape"] for t in manifest["inputs"]}
            record["verification"] = check_against_onnxruntime(
                cfg.out / f"{graph}.plan", src, manifest, cases or [(None, static)], cfg.limits,
                sample=src.with_suffix(".sample.npz") if src.with_suffix(".sample.npz").is_file() else None,
            )  # fmt: skip
            record_path.write_text(json.dumps(record, indent=2) + "\n")
            passed = record["verification"]["passed"]
            log.info("%s: verification %s", graph, "passed" if passed else "FAILED")
            failed += [] if passed else [graph]
    if failed:
        raise BuildError(
            "--verify",
            f"{failed} differ from ONNX Runtime beyond {cfg.limits}; per-output error "
            f"statistics in {cfg.out}/<graph>.plan.json",
        )
    assert cfg.out is not None  # set by BuildConfig.__post_init__
    return cfg.out


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    cli = argparse.ArgumentParser(
        prog="python -m conceptseg_export.trt_build", description=__doc__.splitlines()[0]
    )
    add_cli_args(cli)
    try:
        print(f"wrote TensorRT plans and manifests to {main(from_cli_args(cli.parse_args()))}")
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
