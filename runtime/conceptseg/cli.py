"""``conceptseg`` command line: synth, export, segment, serve, client, demo, eval, bench.

Bad input (a path, a box, a prompt) ends with one line ``error: <argument>: <what and how to
fix it>`` and exit status 2; never a traceback from inside a library.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from conceptseg import benchmark, cli_args, config, contract, evaluate
from conceptseg.inputs import parse_ref, read_image
from conceptseg.masks import to_png
from conceptseg.pipeline_args import (
    add_config_args,
    add_pipeline_args,
    config_from_args,
    pipeline_from_args,
)
from conceptseg.samples import sample_request
from conceptseg.serving.serve_config import ServeConfig
from conceptseg.types import Request, RequestError, Result, UsageError
from conceptseg.weights import is_synthetic
from conceptseg_export import export_config, trt_build

SYNTHETIC_BANNER = (
    "NOTE: these weights are synthetic (random). The pipeline, formats and timings are real; the\n"
    "mask and the answer are meaningless until real checkpoints are given with --weights."
)


def write_outputs(result: Result, prefix: str) -> tuple[Path, Path]:
    """``PREFIX.png`` (mask, 255 = concept), ``PREFIX.json`` and, when instances were asked
    for, ``PREFIX.instance<i>.png`` in the order of the JSON's ``instances``."""
    base = Path(prefix)
    base.parent.mkdir(parents=True, exist_ok=True)
    png, js = base.with_name(base.name + ".png"), base.with_name(base.name + ".json")
    png.write_bytes(to_png(result.mask))
    for i, instance in enumerate(result.instances):
        base.with_name(f"{base.name}.instance{i}.png").write_bytes(to_png(instance.mask))
    js.write_text(json.dumps(result.to_json(), indent=2) + "\n")
    return png, js


def _report(result: Result, png: Path, js: Path, weights: Path) -> None:
    shown = result.to_json()
    if len(shown["text"]) > 300:  # the file keeps all of it
        shown["text"] = shown["text"][:300] + f"... ({len(shown['text'])} characters, see {js})"
    print(json.dumps(shown, indent=2))
    print(f"mask: {png}\nresult: {js}")
    if is_synthetic(weights):
        print(SYNTHETIC_BANNER)


def cmd_synth(args: argparse.Namespace) -> None:
    from conceptseg.checkpoints import synth  # lazy: torch + transformers (writers)

    out = synth(Path(args.out), args.size, args.seed)
    print(
        f"wrote synthetic {args.size} checkpoints to {out}/mllm and {out}/sam3 (random weights, seed {args.seed})"
    )


def cmd_segment(args: argparse.Namespace) -> None:
    request = Request(
        image=read_image(args.image, "--image"),
        question=args.prompt,
        references=tuple(parse_ref(spec, i) for i, spec in enumerate(args.ref or [])),
    )
    pipeline = pipeline_from_args(args, request)
    threshold = args.instance_threshold if args.instances else None
    with _text_printer(args.stream) as on_text:
        result = pipeline.run(request, on_text, instances=threshold)
    png, js = write_outputs(result, args.out)
    _report(result, png, js, Path(args.weights))


@contextmanager
def _text_printer(stream: bool) -> Iterator[Any]:
    """With ``--stream``: the reasoning text to stderr as it is generated (stdout keeps the
    JSON summary), a newline after it."""
    if not stream:
        yield None
        return
    printed = []

    def show(delta: str) -> None:
        printed.append(delta)
        sys.stderr.write(delta)
        sys.stderr.flush()

    try:
        yield show
    finally:
        if printed:
            sys.stderr.write("\n")


def cmd_demo(args: argparse.Namespace) -> None:
    """The bundled sample: through the Triton server (start, request, print, stop) or in-process."""
    from conceptseg.checkpoints import synth  # lazy: torch + transformers (writers)

    weights = Path(args.weights)
    if not (weights / "mllm").exists() or not (weights / "sam3").exists():
        print(f"creating synthetic tiny checkpoints in {weights} ...")
        synth(weights, "tiny", 0)
    request = sample_request()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    request.image.save(out / "target.png")
    for i, ref in enumerate(request.references):
        ref.image.save(out / f"ref{i}.png")
    print(
        f"sample: target {out / 'target.png'}, prompt {request.question!r}, {len(request.references)} references"
    )
    if args.in_process:
        result = pipeline_from_args(args, request).run(request)
        png, js = write_outputs(result, str(out / "demo"))
        _report(result, png, js, weights)
        return
    _demo_served(args, request, weights, out)


def _demo_served(args: argparse.Namespace, request: Request, weights: Path, out: Path) -> None:
    from conceptseg.client import Client  # lazy: tritonclient (the serve extra)
    from conceptseg.serving.server import Server, free_port  # lazy: tritonclient's protos

    engines = Path(args.engines or "engines/tiny")
    if not (engines / "manifest.json").exists():
        print(f"exporting the ONNX engines to {engines} ...")
        cmd_export(
            build_parser().parse_args(["export", "--weights", str(weights), "--out", str(engines)])
        )
    ports = {n: free_port() for n in ("http_port", "grpc_port", "metrics_port")}
    pipeline_config = dataclasses.asdict(config_from_args(args))
    cfg = ServeConfig(engines=engines, **ports, pipeline_config=pipeline_config)
    print(f"starting tritonserver (cpu profile) on {cfg.host} ...", flush=True)
    with Server(cfg) as server:
        print(f"ready: HTTP {cfg.urls['http']}  gRPC {cfg.urls['grpc']}  (log {server.log_path})")
        with Client(cfg.urls["grpc"], protocol="grpc") as client:
            response = client.segment(
                request.image, request.question, [(r.image, r.box) for r in request.references]
            )
        print("stopping tritonserver ...")
    png, js = _write_response(response, str(out / "demo"))
    _show(response.result, png, js, weights)


def _write_response(response: Any, prefix: str) -> tuple[Path, Path]:
    """``PREFIX.png`` and ``PREFIX.json`` from a server response, as ``write_outputs`` does."""
    base = Path(prefix)
    base.parent.mkdir(parents=True, exist_ok=True)
    png, js = base.with_name(base.name + ".png"), base.with_name(base.name + ".json")
    png.write_bytes(to_png(response.mask))
    js.write_text(json.dumps(response.result, indent=2) + "\n")
    return png, js


def _show(shown: dict[str, Any], png: Path, js: Path, weights: Path | None) -> None:
    shown = dict(shown)
    if len(shown.get("text") or "") > 300:  # the file keeps all of it
        shown["text"] = shown["text"][:300] + f"... ({len(shown['text'])} characters, see {js})"
    print(json.dumps(shown, indent=2))
    print(f"mask: {png}\nresult: {js}")
    synthetic = (
        is_synthetic(weights) if weights else shown.get("versions", {}).get("synthetic_weights")
    )
    if synthetic:
        print(SYNTHETIC_BANNER)


def cmd_serve(args: argparse.Namespace) -> None:
    from conceptseg.serving.server import serve_forever  # lazy: tritonclient's protos

    cfg = cli_args.from_cli_args(
        args,
        ServeConfig,
        pipeline_config=dataclasses.asdict(config_from_args(args)),
        api_key=config.api_key(),  # CONCEPTSEG_API_KEY; empty: serve generates one
    )
    if serve_forever(cfg) != 0:
        raise SystemExit(1)


def cmd_client(args: argparse.Namespace) -> None:
    from conceptseg.client import Client, ServerError, split_url  # lazy: tritonclient

    if args.stream and split_url(args.url, args.protocol)[0] != "grpc":
        raise UsageError(
            "--stream", "streaming needs gRPC: --url grpc://HOST:PORT (the server's gRPC port)"
        )
    image = _read_bytes(args.image, "--image")
    references = []
    for i, spec in enumerate(args.ref or []):
        ref = parse_ref(spec, i)
        if ref.box is None:
            raise UsageError(f"--ref #{i + 1}", "the server takes boxes only: IMG:x1,y1,x2,y2")
        references.append((_read_bytes(spec.rpartition(":")[0], f"--ref #{i + 1}"), ref.box))
    options = contract.Options(
        router=not args.no_router, instance_masks=args.instance_masks, mask_format=args.mask_format
    )
    try:
        with Client(args.url, protocol=args.protocol) as client, _text_printer(args.stream) as show:
            if args.stream:
                response = client.segment_stream(image, args.prompt, references, options, show)
            else:
                response = client.segment(image, args.prompt, references, options)
    except ServerError as exc:
        if exc.invalid_argument:
            raise UsageError("server", exc.message) from None
        print(f"error: server ({exc.status}): {exc.message}", file=sys.stderr)
        raise SystemExit(1) from None
    except ConnectionError as exc:
        print(f"error: cannot reach {args.url}: {exc}", file=sys.stderr)
        raise SystemExit(1) from None

    png, js = _write_response(response, args.out)
    _show(response.result, png, js, None)


def _read_bytes(path: str, argument: str) -> bytes:
    read_image(path, argument)  # same checks and messages as `segment`
    return Path(path).read_bytes()


def cmd_export(args: argparse.Namespace) -> None:
    from conceptseg_export.export_config import (
        from_cli_args,  # lazy: the exporters pull torch + onnx
    )
    from conceptseg_export.onnx_export import main as export_main  # lazy: torch + onnx

    export_main(from_cli_args(args))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="conceptseg", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("synth", help="write random-weight checkpoints in the published layouts")
    p.add_argument("--out", required=True)
    p.add_argument("--size", default="tiny", choices=["tiny", "real-3b", "real-7b"])
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_synth)
    p = sub.add_parser("export", help="export SAM 3 and the CTM to ONNX (+ manifests)")
    export_config.add_cli_args(p)
    p.set_defaults(func=cmd_export)
    trt_build.register(sub)
    p = sub.add_parser("segment", help="segment one image")
    add_pipeline_args(p)
    p.add_argument("--image", required=True, help="target image (PNG/JPEG)")
    p.add_argument("--prompt", required=True, help="the concept, e.g. 'red mug'")
    p.add_argument(
        "--ref",
        action="append",
        metavar="IMG:x1,y1,x2,y2",
        help="reference image + box (0-4 times)",
    )
    p.add_argument("--out", required=True, help="output prefix: writes PREFIX.png and PREFIX.json")
    p.add_argument("--stream", action="store_true", help="print the reasoning text to stderr live")
    p.add_argument("--instances", action="store_true",
                   help="also write SAM 3's instances (PREFIX.instance<i>.png, JSON instances)")  # fmt: skip
    p.add_argument("--instance-threshold", type=float, default=contract.Options().instance_threshold,
                   help="keep instances scoring at least this")  # fmt: skip
    p.set_defaults(func=cmd_segment)
    p = sub.add_parser("serve", help="run the Triton server on exported engines (Ctrl-C stops)")
    cli_args.add_cli_args(p, ServeConfig)
    add_config_args(p)
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser("client", help="send one request to a running server")
    p.add_argument("--url", required=True, help="HOST:PORT (or http://, grpc://)")
    p.add_argument("--protocol", default=None, choices=["http", "grpc"], help="default: http")
    p.add_argument("--image", required=True, help="target image (PNG/JPEG)")
    p.add_argument("--prompt", required=True)
    p.add_argument(
        "--ref", action="append", metavar="IMG:x1,y1,x2,y2", help="reference + box (0-4 times)"
    )
    p.add_argument("--no-router", action="store_true", help="always reason (skip the SAM 3 probe)")
    p.add_argument("--instance-masks", action="store_true", help="also return instance masks")
    p.add_argument("--mask-format", default="png", choices=["png", "rle"])
    p.add_argument("--out", required=True, help="output prefix: writes PREFIX.png and PREFIX.json")
    p.add_argument(
        "--stream", action="store_true", help="gRPC: print the reasoning text to stderr live"
    )
    p.set_defaults(func=cmd_client)
    p = sub.add_parser(
        "demo", help="the bundled sample through the Triton server (creates weights and engines)"
    )
    add_pipeline_args(p, weights_default="weights/tiny")
    p.add_argument("--out", default="out/demo")
    p.add_argument("--in-process", action="store_true", help="run the pipeline here, no server")
    p.set_defaults(func=cmd_demo)
    evaluate.register(sub)
    benchmark.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (RequestError, UsageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
