"""``conceptseg bench mllm``: the MLLM's prefill and decode on the bundled sample request, side by side.

Contenders (all as the pipeline runs them, greedy with the reference's decision rule):
- ``hf_bf16``: transformers' Qwen2.5-VL in bf16 as transformers runs it (SDPA, bf16 weights),
- ``hf_<--hf-precision>`` (ours, int4 or int8): the same loaded model, prefill in bf16,
  decode steps on weight-only int4 / int8 copies of the decoder and LM head, one-query attention
  in float32 matmuls (:class:`HfMllm`, prefix cache off; ``hf_bf16`` runs it with
  ``as_transformers_runs_it``, so both share one copy of the weights),
- ``ortgenai_int4``: the exported graphs under onnxruntime-genai (:class:`OrtGenaiMllm`,
  ``ENGINES/mllm/int4``: fp32 vision tower and embedding, int4 RTN decoder).

Per repeat each contender generates exactly ``--new-tokens`` tokens (stop ids are ignored, so all
decode the same number of steps whatever random weights pick). Prefill = vision tower + prompt
(both images), up to the first logits; decode = the token steps after it. All backends time the
same span (``Generation.prefill_ms`` / ``decode_ms``; preprocessing excluded). ``request_s``:
prefill + ``--request-tokens`` x the median decode step, a whole reasoning request's MLLM time
derived from the two medians (``bench request`` measures whole requests).

What limits decoding: every step reads all decoder weights (and the KV cache so far) once, so
``bytes per token / memory read bandwidth`` bounds the rate. The record gives both byte counts,
the machine's read bandwidth measured in the same run, and the fraction of that bound reached.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from conceptseg.benchmark import RUNNERS, side_by_side, summary
from conceptseg.benchmark import row as table_row


def hf_bytes_per_token(model: Any, low_bit: bool = False) -> int:
    """Bytes of weights one decode step of ``HfMllm`` reads: every language-model parameter but
    the token-embedding table (one row is gathered), plus the LM head (the same tensor when the
    embeddings are tied, read once as the head). ``low_bit``: weight-only layers count their
    packed copies and scales (what their decode steps read) instead of their bf16 weights."""
    from conceptseg.models.weight_only import DecodeLinear

    language = model.model.language_model
    embed = language.get_input_embeddings().weight
    swapped = [m for m in language.modules() if low_bit and isinstance(m, DecodeLinear)]
    skip = {id(embed), *(id(m.weight) for m in swapped)}
    total = sum(p.numel() * p.element_size() for p in language.parameters() if id(p) not in skip)
    total += sum(m.packed.nbytes + m.scales.nbytes for m in swapped)
    head = model.lm_head
    if low_bit and isinstance(head, DecodeLinear):
        return int(total + head.packed.nbytes + head.scales.nbytes)
    return int(total + head.weight.numel() * head.weight.element_size())


def onnx_bytes_per_token(decoder: Path) -> int:
    """Bytes of initializers in an ort-genai decoder graph (``model.onnx`` + external data) that
    one decode step reads whole. The graph takes ``inputs_embeds`` (embeddings excluded); int4
    MatMulNBits weights count as stored (packed nibbles + scales); tables read one row per step
    (consumed only by Gather or as rotary cos/sin caches) are left out."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    model = onnx.load(str(decoder), load_external_data=False)
    consumers: dict[str, list[tuple[str, int]]] = {}
    for node in model.graph.node:
        for slot, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node.op_type, slot))

    def row_lookup(op: str, slot: int) -> bool:
        return (
            op.startswith("Gather")
            or op.endswith("RotaryEmbedding")
            or (
                op == "GroupQueryAttention" and slot >= 7  # cos_cache, sin_cache
            )
        )

    total = 0
    for init in model.graph.initializer:
        uses = consumers.get(init.name, [])
        if uses and all(row_lookup(op, slot) for op, slot in uses):
            continue
        if uses_external_data(init):
            total += int({e.key: e.value for e in init.external_data}["length"])
        else:
            total += onnx.numpy_helper.to_array(init).nbytes
    return total


def kv_bytes_per_token(text_config: dict[str, Any], context: int, element_bytes: int) -> int:
    """Bytes of KV cache one decode step reads at ``context`` cached positions."""
    heads = text_config["num_key_value_heads"]
    head_dim = (
        text_config.get("head_dim")
        or text_config["hidden_size"] // text_config["num_attention_heads"]
    )
    return 2 * text_config["num_hidden_layers"] * heads * head_dim * context * element_bytes


def read_bandwidth_gbs(threads: int, gib: float = 1.0, repeats: int = 5) -> float:
    """Memory read bandwidth (GB/s): median over ``repeats`` of a ``threads``-thread sum over a
    ``gib`` GiB float32 tensor (far larger than the caches)."""
    import torch

    torch.set_num_threads(threads)
    data = torch.ones(int(gib * 2**30) // 4)
    data.sum()  # first touch
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        data.sum()
        times.append(time.perf_counter() - start)
    return data.numel() * 4 / statistics.median(times) / 1e9


def bench_mllm(args: argparse.Namespace, side_by_side: Any, summary: Any, runner: Any) -> dict:
    import torch

    from conceptseg.backends.hf_mllm import HfMllm, as_transformers_runs_it
    from conceptseg.backends.ortgenai_mllm import OrtGenaiMllm
    from conceptseg_export.mllm_export import compare_generations, sample_inputs

    torch.set_num_threads(args.threads)
    bandwidth = read_bandwidth_gbs(args.threads)
    print(f"memory read bandwidth: {bandwidth:.1f} GB/s ({args.threads} threads)", flush=True)
    msgs, images = sample_inputs()
    weights, engines = Path(args.weights) / "mllm", Path(args.engines) / "mllm"
    n = args.new_tokens
    hf = HfMllm(weights, precision=args.hf_precision, max_new_tokens=n)
    genai = OrtGenaiMllm(engines / args.precision, max_new_tokens=n, threads=args.threads)
    for backend in (hf, genai):
        backend.stop_ids = set()  # exactly n steps each, whatever the random weights pick

    def transformers_bf16() -> Any:
        with as_transformers_runs_it(hf.model):
            return hf.generate(msgs, images)

    ours, name = f"hf_{args.hf_precision}", f"ortgenai_{args.precision}"
    contenders = {"hf_bf16": transformers_bf16, ours: lambda: hf.generate(msgs, images),
                  name: lambda: genai.generate(msgs, images)}  # fmt: skip
    prefill: dict[str, list[float]] = {k: [] for k in contenders}
    decode: dict[str, list[float]] = {k: [] for k in contenders}

    def recording(key: str) -> Any:
        def run() -> Any:
            out = contenders[key]()
            prefill[key].append(out.prefill_ms)
            decode[key].append(out.decode_ms / max(len(out.token_ids), 1))
            print(f"  {key}: prefill {out.prefill_ms / 1e3:.2f} s, "
                  f"{len(out.token_ids) / (out.decode_ms / 1e3):.2f} tok/s", flush=True)  # fmt: skip
            return out

        return run

    result = side_by_side({k: recording(k) for k in contenders}, args.repeats, args.warmup, runner)
    outputs = result["outputs"]
    ref = outputs["hf_bf16"]
    forced = {ours: hf.generate(msgs, images, forced=ref.token_ids),
              name: genai.decode(msgs, images, forced=ref.token_ids)}  # fmt: skip
    prompt = ref.prompt_tokens
    text_config = hf.model.config.text_config.to_dict()
    context = prompt + n // 2  # mean cached positions over the decode steps
    weight_bytes = {"hf_bf16": hf_bytes_per_token(hf.model),
                    ours: hf_bytes_per_token(hf.model, low_bit=True),
                    name: onnx_bytes_per_token(engines / args.precision / "model.onnx")}  # fmt: skip
    kv_bytes = {
        "hf_bf16": kv_bytes_per_token(text_config, context, 2),
        ours: kv_bytes_per_token(text_config, context, 2),
        name: kv_bytes_per_token(text_config, context, 4),
    }  # ort-genai's cache is fp32 here
    rows: dict[str, Any] = {}
    for key in contenders:
        skip = args.warmup  # the recorder also saw the warm-up runs
        step_ms = summary(decode[key][skip:])
        per_token = weight_bytes[key] + kv_bytes[key]
        rate = 1e3 / step_ms["median_ms"]
        prefill_ms = summary(prefill[key][skip:])
        rows[key] = {
            "prefill": prefill_ms,
            "prefill_tokens": prompt,
            "decode_step": step_ms,
            "decode_tokens_per_s": rate,
            "new_tokens": n,
            "request_s": (prefill_ms["median_ms"] + args.request_tokens * step_ms["median_ms"]) / 1e3,
            "request_tokens": args.request_tokens,
            "weight_bytes_per_token": weight_bytes[key],
            "kv_bytes_per_token": kv_bytes[key],
            "bandwidth_bound_tokens_per_s": bandwidth * 1e9 / per_token,
            "fraction_of_bound": rate * per_token / (bandwidth * 1e9),
        }
    for key in (ours, name):
        rows[key]["vs_hf_bf16"] = {
            "free_running": compare_generations(ref, outputs[key]),
            "teacher_forced": compare_generations(ref, forced[key], forced=True),
            "decode_speedup": rows[key]["decode_tokens_per_s"] / rows["hf_bf16"]["decode_tokens_per_s"],
            "prefill_speedup": rows["hf_bf16"]["prefill"]["median_ms"] / rows[key]["prefill"]["median_ms"],
            "request_speedup": rows["hf_bf16"]["request_s"] / rows[key]["request_s"],
        }
    rows[ours][f"vs_{name}"] = {"request_speedup": rows[name]["request_s"] / rows[ours]["request_s"]}
    rows["memory_read_bandwidth_gbs"] = bandwidth
    return rows


def print_table(rows: dict[str, Any]) -> None:
    print(f"{'contender':16} {'prefill s':>10} {'tokens':>7} {'decode tok/s':>13} {'request s':>10} "
          f"{'GB/token':>9} {'bound tok/s':>12} {'of bound':>9}")  # fmt: skip
    for key, row in rows.items():
        if not isinstance(row, dict):
            continue
        gb = (row["weight_bytes_per_token"] + row["kv_bytes_per_token"]) / 1e9
        print(f"{key:16} {row['prefill']['median_ms'] / 1e3:10.2f} {row['prefill_tokens']:7d} "
              f"{row['decode_tokens_per_s']:13.2f} {row['request_s']:10.1f} {gb:9.3f} "
              f"{row['bandwidth_bound_tokens_per_s']:12.2f} {row['fraction_of_bound']:9.2f}")  # fmt: skip
    for key, row in rows.items():
        if isinstance(row, dict) and "vs_hf_bf16" in row:
            vs = row["vs_hf_bf16"]
            print(f"{key} vs hf_bf16: decode {vs['decode_speedup']:.2f}x, prefill "
                  f"{vs['prefill_speedup']:.2f}x, request {vs['request_speedup']:.2f}x, tokens agree "
                  f"{vs['free_running']['agreement']:.2f} free running / "
                  f"{vs['teacher_forced']['agreement']:.2f} teacher-forced")  # fmt: skip
    print(json.dumps({"memory_read_bandwidth_gbs": rows.get("memory_read_bandwidth_gbs")}))


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--new-tokens", type=int, default=32, help="mllm: decode steps per run")
    parser.add_argument("--precision", default="int4", help="mllm: ENGINES/mllm/<precision>")
    parser.add_argument("--hf-precision", default="int4", choices=["int4", "int8"],
                        help="mllm: ours (hf backend): bf16 prefill, decode on int4 / int8 copies")  # fmt: skip
    parser.add_argument("--request-tokens", type=int, default=200,
                        help="mllm: new tokens of the derived whole-request time (request_s)")  # fmt: skip


def run(args: argparse.Namespace) -> dict[str, Any]:
    return bench_mllm(args, side_by_side, summary, RUNNERS[args.runner])


def rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Prefill and decode-step rows per contender; token agreement vs bf16 (teacher-forced)."""
    out = []
    for key, r in results.items():
        if not isinstance(r, dict):
            continue
        vs = r.get("vs_hf_bf16", {})
        agree = {"token_agreement": vs["teacher_forced"]["agreement"]} if vs else {}
        out.append(table_row("prefill", key, r["prefill"], tokens=r["prefill_tokens"], **agree))
        out.append(table_row("decode step", key, r["decode_step"],
                       tokens_per_s=r["decode_tokens_per_s"],
                       fraction_of_bound=r["fraction_of_bound"], **agree))  # fmt: skip
        derived = {"p50_ms": r["request_s"] * 1e3}  # prefill + N x the median step
        out.append(table_row(f"request ({r['request_tokens']} tokens, derived)", key, derived, **agree))
    return out
