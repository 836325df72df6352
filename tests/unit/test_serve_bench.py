"""``bench.py serve``'s pure parts: perf_analyzer input data from contract tensors, its CSV.

Run: .venv/bin/pytest tests/unit/test_serve_bench.py -q
"""

from __future__ import annotations

import base64
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import serve_bench  # noqa: E402

from conceptseg import contract  # noqa: E402


def unpack(raw: bytes) -> list[bytes]:
    items, at = [], 0
    while at < len(raw):
        (n,) = struct.unpack_from("<I", raw, at)
        items.append(raw[at + 4 : at + 4 + n])
        at += 4 + n
    return items


def test_bytes_tensors_go_as_serialized_b64_with_their_shape():
    arrays = {
        "image": np.array([[b"\x89PNG\x00\xff"]], dtype=np.object_),
        "ref_images": np.array([[b"a", b"", b"\x00bc"]], dtype=np.object_),
        "ref_boxes": np.array([[[0, 1, 2, 3], [4, 5, 6, 7.5], [1, 1, 2, 2]]], np.float32),
    }
    entry = serve_bench.input_data(arrays)["data"][0]
    assert unpack(base64.b64decode(entry["image"]["b64"])) == [b"\x89PNG\x00\xff"]
    assert entry["image"]["shape"] == [1]
    assert unpack(base64.b64decode(entry["ref_images"]["b64"])) == [b"a", b"", b"\x00bc"]
    assert entry["ref_images"]["shape"] == [3]
    assert entry["ref_boxes"] == {
        "content": [0, 1, 2, 3, 4, 5, 6, 7.5, 1, 1, 2, 2],
        "shape": [3, 4],
    }


def test_the_reasoning_request_round_trips():
    _, arrays = serve_bench.requests()["reason"]
    entry = serve_bench.input_data(arrays)["data"][0]
    assert set(entry) == set(arrays) <= set(contract.INPUTS)
    for name, array in arrays.items():
        if array.dtype == np.object_:
            assert unpack(base64.b64decode(entry[name]["b64"])) == [bytes(x) for x in array.ravel()]


CSV = """Concurrency,Inferences/Second,Client Send,Network+Server Send/Recv,Server Queue,Server Compute Input,Server Compute Infer,Server Compute Output,Client Recv,p50 latency,p90 latency,p95 latency,p99 latency
1,10.991,14,299,2122,51,86722,666,7,88174,105952,119882,132802
2,16.6125,14,1125,2579,46,113202,760,6,118262,134220,137276,143786
"""  # a real perf_analyzer 2.41 report (tiny engines, fast route), header and all


def test_csv_rows_in_milliseconds():
    rows = serve_bench.parse_csv(CSV)
    assert rows[0] == {"concurrency": 1, "throughput_rps": 10.991, "p50_ms": 88.174,
                       "p90_ms": 105.952, "p99_ms": 132.802, "server_queue_ms": 2.122,
                       "server_compute_ms": 86.722}  # fmt: skip
    assert rows[1]["concurrency"] == 2 and rows[1]["p99_ms"] == pytest.approx(143.786)


def test_bench_serve_takes_the_ort_genai_precision():
    import argparse

    from conceptseg.benchmark import common_args

    parser = argparse.ArgumentParser()
    common_args(parser)
    serve_bench.add_args(parser)
    args = parser.parse_args(["--mllm-backend", "ort-genai", "--precision", "int4"])
    assert args.precision == "int4"
    assert parser.parse_args([]).precision == "fp32"
