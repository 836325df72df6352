"""``benchmarks/bench.py mllm`` on the tiny checkpoint: it runs every contender for exactly the
requested tokens, and its bytes-per-token figures equal counts made independently from the
checkpoint's tensor shapes (bf16 and torch int4 exactly; ort-genai int4 within 1% of
blocks-of-32 nibbles + fp32 scales).

Run: .venv/bin/pytest tests/models/test_bench_mllm.py -q
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

pytest.importorskip("onnxruntime_genai", reason="pip install onnxruntime-genai==0.18.0")

ROOT = Path(__file__).resolve().parents[2]
TOKENS = 3


def checkpoint_shapes(mllm: Path) -> dict[str, list[int]]:
    shapes = {}
    for path in sorted(mllm.glob("*.safetensors")):
        with safe_open(str(path), "pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open has no __iter__)
                shapes[key] = handle.get_slice(key).get_shape()
    return shapes


def decoder_tensors(shapes: dict[str, list[int]]) -> dict[str, list[int]]:
    """Text decoder tensors read per step: layers, final norm, and the head (tied: the embeddings)."""
    picked = {k: s for k, s in shapes.items() if k.startswith("model.layers.")}
    picked["model.norm.weight"] = shapes["model.norm.weight"]
    picked["head"] = shapes.get("lm_head.weight", shapes["model.embed_tokens.weight"])
    return picked


def int4_bytes(shape: list[int], block: int = 32) -> int:
    if len(shape) == 1:
        return 4 * shape[0]  # norms and biases stay fp32
    rows, cols = shape
    blocks = rows * math.ceil(cols / block)
    return blocks * (block // 2) + blocks * 4  # packed nibbles + one fp32 scale per block


@pytest.fixture(scope="module")
def record(tiny_weights, tiny_engines):
    command = [sys.executable, str(ROOT / "benchmarks" / "bench.py"), "mllm",
               "--weights", str(tiny_weights), "--engines", str(tiny_engines),
               "--repeats", "1", "--warmup", "0", "--threads", "1", "--new-tokens", str(TOKENS)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "decode tok/s" in done.stdout  # the table
    return json.loads(done.stdout.strip().splitlines()[-1])


def torch_int4_bytes(shape: list[int], group: int = 32) -> int:
    if len(shape) == 1:
        return 2 * shape[0]  # norms and biases stay bf16
    rows, cols = shape
    return rows * cols // 2 + (cols // group) * rows * 2 * 2  # nibbles + bf16 (scale, zero)


def test_every_contender_decodes_the_requested_tokens(record):
    rows = record["results"]
    assert record["target"] == "mllm" and record["machine"]["cores"] >= 1
    for key in ("hf_bf16", "hf_int4", "ortgenai_int4"):
        row = rows[key]
        assert row["new_tokens"] == TOKENS
        assert row["decode_tokens_per_s"] > 0 and row["prefill"]["median_ms"] > 0
        assert row["prefill_tokens"] > 2 * 441  # two 588 px images: 441 merged patches each
        assert 0 < row["fraction_of_bound"]
        want = row["prefill"]["median_ms"] + row["request_tokens"] * row["decode_step"]["median_ms"]
        assert row["request_s"] == pytest.approx(want / 1e3)
    for key in ("hf_int4", "ortgenai_int4"):
        vs = rows[key]["vs_hf_bf16"]
        assert vs["free_running"]["tokens"] == TOKENS  # stop ids ignored: exactly TOKENS steps
        assert vs["teacher_forced"]["tokens"] == TOKENS
        assert vs["request_speedup"] == pytest.approx(rows["hf_bf16"]["request_s"] / rows[key]["request_s"])
    assert rows["memory_read_bandwidth_gbs"] > 0
    derived = {r["contender"]: r for r in record["rows"] if r["step"].startswith("request (")}
    assert set(derived) == {"hf_bf16", "hf_int4", "ortgenai_int4"}
    for key, row in derived.items():
        assert row["p50_ms"] == pytest.approx(rows[key]["request_s"] * 1e3)


def test_bytes_per_token_match_the_checkpoint(record, tiny_weights):
    rows = record["results"]
    tensors = decoder_tensors(checkpoint_shapes(tiny_weights / "mllm"))
    assert rows["hf_bf16"]["weight_bytes_per_token"] == 2 * sum(
        math.prod(s) for s in tensors.values()
    )
    expected = sum(int4_bytes(s) for s in tensors.values())
    assert rows["ortgenai_int4"]["weight_bytes_per_token"] == pytest.approx(expected, rel=0.01)
    assert rows["hf_int4"]["weight_bytes_per_token"] == sum(torch_int4_bytes(s) for s in tensors.values())
    config = json.loads((tiny_weights / "mllm" / "config.json").read_text())
    text = config.get("text_config", config)
    kv_heads, layers = text["num_key_value_heads"], text["num_hidden_layers"]
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    context = rows["hf_bf16"]["prefill_tokens"] + TOKENS // 2
    assert rows["hf_bf16"]["kv_bytes_per_token"] == 2 * layers * kv_heads * head_dim * context * 2


def test_bench_batch_reports_whole_runs_steady_steps_and_invariance(tiny_engines):
    command = [sys.executable, str(ROOT / "benchmarks" / "bench.py"), "batch",
               "--engines", str(tiny_engines), "--precision", "fp32", "--repeats", "1",
               "--warmup", "0", "--threads", "1", "--new-tokens", "4", "--batch-sizes", "1,3"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "steady step" in done.stdout  # the table
    results = json.loads(done.stdout.strip().splitlines()[-1])["results"]
    assert [results[k]["concurrent"] for k in ("batch_1", "batch_3")] == [1, 3]
    for key in ("batch_1", "batch_3"):
        row = results[key]
        assert row["steady_tokens_per_s"] == pytest.approx(row["concurrent"] * 1e3 / row["steady_step_ms"])
    assert results["batch_1"]["speedup_vs_1"] == results["batch_1"]["steady_speedup_vs_1"] == 1
    assert results["invariance"]["tokens_equal"] is True
    assert results["invariance"]["states_max_abs"] <= 1e-4
