"""Which ONNX ops of a graph the deployment TensorRT's ONNX parser cannot import.

The supported set is data: ``trt_supported_ops.json`` beside this file, read from onnx-tensorrt's
``docs/operators.md`` at the commit a TensorRT release builds its parser from (the file names it).
When that release's major is not the deployment container's (``gpu_stack.toml``), the table's
``deployment.unverified_ops`` (ops not in an older list of that major) count as unsupported. Only the default ONNX domain ("" or "ai.onnx") is checked against it; every node of
another domain (com.microsoft, ai.onnx.ml, plugins) counts as unsupported. Nodes inside subgraphs
(If/Loop/Scan bodies) and inside model-local functions are walked; a call to a model-local
function is not itself an op (the parser inlines the function), its body is.

This is a pre-flight check: TensorRT's parser stays the final word (restrictions such as "axes
must be an initializer" are listed in the JSON and reported as notes, not verified).

    python -m conceptseg_export.op_check engines/NAME     # exit 1 on any unsupported op
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

from google.protobuf.message import DecodeError

from conceptseg import gpu_stack

if TYPE_CHECKING:
    import onnx

SUPPORTED_OPS_FILE = Path(__file__).with_name("trt_supported_ops.json")
DEFAULT_DOMAINS = ("", "ai.onnx")


@cache
def supported_ops(path: Path = SUPPORTED_OPS_FILE) -> dict:
    """The JSON table: ``supported_ops`` (list), ``restrictions`` (op -> note), ``source``..."""
    return json.loads(Path(path).read_text())


def _op_key(domain: str, op_type: str) -> str:
    """``op_type`` for the default domain, ``domain::op_type`` otherwise."""
    return op_type if domain in DEFAULT_DOMAINS else f"{domain}::{op_type}"


def _walk(nodes, local_functions: set[tuple[str, str]]) -> Iterator[str]:
    """Op keys of ``nodes`` and of every subgraph in their attributes, depth first."""
    for node in nodes:
        if (node.domain, node.op_type) not in local_functions:
            yield _op_key(node.domain, node.op_type)
        for attr in node.attribute:
            if attr.type == 5:  # onnx.AttributeProto.GRAPH
                yield from _walk(attr.g.node, local_functions)
            elif attr.type == 10:  # onnx.AttributeProto.GRAPHS
                for graph in attr.graphs:
                    yield from _walk(graph.node, local_functions)


def op_counts(model: onnx.ModelProto) -> Counter[str]:
    """Every op of ``model`` (main graph, subgraphs, local function bodies) -> node count."""
    local = {(f.domain, f.name) for f in model.functions}
    counts = Counter(_walk(model.graph.node, local))
    for function in model.functions:
        counts.update(_walk(function.node, local))
    return counts


def _load(onnx_path: str | Path) -> onnx.ModelProto:
    # Weights are not needed to read the graph; large exports keep them in external files.
    import onnx  # lazy: 0.9 s of imports; `conceptseg --help` registers build-engines' flags

    return onnx.load(str(onnx_path), load_external_data=False)


def deployment_supported(table: dict) -> set[str]:
    """The ops taken as supported by the deployment container's TensorRT."""

    supported = set(table["supported_ops"])
    if str(table["tensorrt_version"]).split(".")[0] != gpu_stack.load().tensorrt_major:
        supported -= set(table.get("deployment", {}).get("unverified_ops", supported))
    return supported


def _unsupported(counts: Counter[str], table: Path) -> dict[str, int]:
    supported = deployment_supported(supported_ops(table))
    return {op: n for op, n in sorted(counts.items()) if op not in supported}


def unsupported_ops(onnx_path: str | Path, table: Path = SUPPORTED_OPS_FILE) -> dict[str, int]:
    """Ops of the graph at ``onnx_path`` the parser does not support -> node count.

    Keys are ``op_type`` for the default domain and ``domain::op_type`` for other domains (all of
    which count as unsupported). Empty when every node is supported.
    """
    return _unsupported(op_counts(_load(onnx_path)), table)


ORT_ONLY_SUFFIX = ".int8.onnx"  # dynamic-int8 graphs for ONNX Runtime's CPU kernels


def tensorrt_graphs(directory: str | Path) -> list[Path]:
    """The ``*.onnx`` of an engines directory that TensorRT builds from: all but the
    ``*.int8.onnx`` ones (``--parts sam3_vision_int8``: ONNX Runtime only, not TensorRT inputs)."""
    return sorted(p for p in Path(directory).glob("*.onnx") if not p.name.endswith(ORT_ONLY_SUFFIX))


def check_dir(directory: str | Path) -> tuple[dict[str, dict[str, int]], dict[str, list[str]]]:
    """For every graph of :func:`tensorrt_graphs`: its unsupported ops, and its restricted ops used."""
    paths = tensorrt_graphs(directory)
    if not paths:
        raise FileNotFoundError(f"{directory}: no *.onnx files; give the engines/NAME directory")
    restrictions = supported_ops()["restrictions"]
    unsupported, restricted = {}, {}
    for path in paths:
        try:
            counts = op_counts(_load(path))
        except DecodeError as exc:
            raise ValueError(f"{path}: not an ONNX model ({exc})") from None
        unsupported[path.name] = _unsupported(counts, SUPPORTED_OPS_FILE)
        restricted[path.name] = sorted(op for op in counts if op in restrictions)
    return unsupported, restricted


def format_table(results: dict[str, dict[str, int]], notes: dict[str, list[str]]) -> str:
    """Human table: one row per graph; unsupported ops with counts; restricted ops used."""
    rows = [("graph", "status", "unsupported ops (count)", "supported with restrictions")]
    for name, bad in results.items():
        status = "OK" if not bad else "UNSUPPORTED"
        listed = ", ".join(f"{op} ({n})" for op, n in bad.items()) or "-"
        rows.append((name, status, listed, ", ".join(notes.get(name, [])) or "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row[:3], widths, strict=True)) + "  " + row[3]
        for row in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m conceptseg_export.op_check",
        description="Check every *.onnx of a directory against TensorRT's ONNX op support.",
    )
    parser.add_argument("directory", help="engines/NAME (the exported *.onnx graphs)")
    args = parser.parse_args(argv)
    try:
        results, notes = check_dir(args.directory)
    except (OSError, ValueError) as exc:  # no graphs there, or a file that is not ONNX
        print(f"error: {exc}", file=sys.stderr)
        return 2
    source = supported_ops()["source"]
    print(format_table(results, notes))
    print(
        f"(TensorRT {supported_ops()['tensorrt_version']}; ops from {source['repository']}:"
        f"{source['file']}@{source['commit'][:12]}; restrictions: {SUPPORTED_OPS_FILE.name})"
    )
    return 1 if any(results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
