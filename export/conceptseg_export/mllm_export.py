"""``conceptseg export --parts mllm``: the Qwen2.5-VL of a ConceptSeg-R1 checkpoint for ONNX Runtime GenAI.

Three graphs, laid out as onnxruntime-genai 0.18's ``qwen2_5_vl`` multimodal model wants them
(``genai_config.json``: ``vision`` -> ``embedding`` -> ``decoder``), so that images run in ONNX
Runtime too and no torch model is loaded at serving time:

- ``vision.onnx``: the vision tower for one 588x588 image (every image of the pipeline is 600x600,
  which Qwen's processor resizes to 588x588): ``pixel_values`` (1764, 1176) float32 +
  ``image_grid_thw`` (1, 3) int64 -> ``image_features`` (441, H). Static shapes: the rotary
  table, the window order and the window layout are constants of the graph; window attention runs
  as 36 padded windows of at most 64 patches. ort-genai runs it once per image.
- ``embedding.onnx``: ``input_ids`` (B, S) int64 + ``image_features`` (N, H) -> ``inputs_embeds``
  (B, S, H): token embeddings with the image features written at the ``<|image_pad|>`` positions
  in order (``masked_scatter`` in transformers); ``N = 0`` on decode steps.
- ``<precision>/model.onnx``: the text decoder from ort-genai's model builder
  (``exclude_embeds``: takes ``inputs_embeds``; ``include_hidden_states``: also returns the
  final-norm states the CTM reads; ``prune_lm_head``: last-position logits only). fp32 and int4
  (RTN MatMulNBits, block 32, accuracy level 4) builds share the vision and embedding graphs.

Output: ``OUT/mllm/{vision,embedding}.onnx``, ``OUT/mllm/<precision>/{genai_config.json,model.onnx}``,
``OUT/mllm/processor/`` (tokenizer, chat template, image processor and generation config: the
exact preprocessing of the hf backend), and ``OUT/mllm/mllm.json`` with parity figures against
transformers: vision/embedding max |ORT - torch|, and per precision a greedy run on the bundled
sample request (token agreement with the hf backend, hidden-state max difference).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision
from transformers.vision_utils import get_vision_position_ids, get_vision_window_index

from conceptseg import cli_args
from conceptseg.backends.hf_mllm import HfMllm, load_qwen
from conceptseg.backends.ortgenai_mllm import OrtGenaiMllm
from conceptseg.models import qwen
from conceptseg.prompt import mllm_inputs
from conceptseg.samples import sample_request
from conceptseg.types import UsageError
from conceptseg.weights import safetensors_files
from conceptseg_export import genai_builder
from conceptseg_export.export_config import MLLM_PRECISIONS
from conceptseg_export.manifest import export_versions, sha256_files

GRID = (1, 42, 42)  # (t, h, w) patches of a 588x588 image: 600x600 after Qwen's smart resize
PATCH_DIM = 1176  # 3 channels x 2 frames x 14 x 14
IMAGE_TOKEN_ID = qwen.IMAGE_PAD_ID
PRECISIONS = MLLM_PRECISIONS  # ort-genai decoder builds (conceptseg.build)
GENAI_VERSION = "0.18.0"  # pinned in pyproject.toml; the genai_config layout below is its
PROCESSOR_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "config.json",
)


class QwenVisionGraph(nn.Module):
    """Qwen2.5-VL's vision tower for one image of a fixed patch grid (the published computation).

    transformers' ``Qwen2_5_VisionTransformerPretrainedModel.forward`` derives its rotary table,
    window order and window boundaries from ``grid_thw`` with Python loops; for one grid they are
    constants, so they are computed here once (with transformers' own helpers) and stored as
    buffers. Windowed blocks attend within 36 windows padded to 64 patches (-inf key bias on the
    padding); full-attention blocks attend over the whole image. ``image_grid_thw`` is accepted
    for ort-genai's vision contract and must equal ``grid``.
    """

    def __init__(self, visual: nn.Module, grid: tuple[int, int, int] = GRID) -> None:

        super().__init__()
        self.visual = visual
        self.grid = grid
        grid_thw = torch.tensor([grid])
        unit = visual.spatial_merge_unit
        n = grid[0] * grid[1] * grid[2]
        window_index, cu_window = get_vision_window_index(
            grid_thw, visual.spatial_merge_size, visual.window_size, visual.patch_size
        )
        positions = get_vision_position_ids(grid_thw, visual.spatial_merge_size)
        cos, sin = visual.rotary_pos_emb(torch.zeros(n, 1), positions)  # (n, head_dim)
        order = (window_index[:, None] * unit + torch.arange(unit)).reshape(-1)  # patch order
        lengths = (cu_window[1:] - cu_window[:-1]).tolist()
        longest, starts = max(lengths), cu_window[:-1].tolist()
        gather = torch.zeros(len(lengths), longest, dtype=torch.long)
        valid = torch.zeros(len(lengths), longest, dtype=torch.bool)
        for w, (start, length) in enumerate(zip(starts, lengths, strict=True)):
            gather[w, :length] = torch.arange(start, start + length)
            valid[w, :length] = True
        self.register_buffer("order", order, persistent=False)  # (n,)
        self.register_buffer("cos", cos[order], persistent=False)  # (n, head_dim), window order
        self.register_buffer("sin", sin[order], persistent=False)
        self.register_buffer("reverse", torch.argsort(window_index), persistent=False)  # (n/4,)
        self.register_buffer("window_gather", gather, persistent=False)  # (W, Lw)
        key_bias = torch.zeros(valid.shape).masked_fill(~valid, -torch.inf)
        self.register_buffer("window_bias", key_bias[:, None, None, :], persistent=False)
        self.register_buffer("window_keep", valid.reshape(-1).nonzero()[:, 0], persistent=False)
        weight = visual.patch_embed.proj.weight  # Conv3d with stride = kernel: one matmul
        patch = weight.detach().reshape(weight.shape[0], -1).t().contiguous()  # (1176, C)
        self.register_buffer("patch_weight", patch, persistent=False)

    def _attention(self, block: nn.Module, x: torch.Tensor, windowed: bool) -> torch.Tensor:

        attn = block.attn
        n = x.shape[0]
        q, k, v = attn.qkv(x).reshape(n, 3, attn.num_heads, -1).unbind(1)  # each (n, heads, d)
        q, k = apply_rotary_pos_emb_vision(q, k, self.cos, self.sin)
        if windowed:  # (W, Lw, heads, d) -> (W, heads, Lw, d)
            q, k, v = (t[self.window_gather].transpose(1, 2) for t in (q, k, v))
            bias = self.window_bias
        else:  # one image: one sequence
            q, k, v = (t.transpose(0, 1)[None] for t in (q, k, v))
            bias = None
        scores = torch.matmul(q, k.transpose(-1, -2)) * attn.scaling
        if bias is not None:
            scores = scores + bias
        out = torch.matmul(torch.softmax(scores.float(), dim=-1), v).transpose(1, 2)
        out = out.reshape(-1, attn.dim)
        if windowed:
            out = out[self.window_keep]  # drop the padding rows: back to (n, C)
        return attn.proj(out)

    def forward(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> torch.Tensor:
        del image_grid_thw  # fixed by the graph (see the class docstring)
        x = torch.matmul(pixel_values, self.patch_weight)[self.order]  # (n, C), window order
        for i, block in enumerate(self.visual.blocks):
            windowed = i not in self.visual.fullatt_block_indexes
            x = x + self._attention(block, block.norm1(x), windowed)
            x = x + block.mlp(block.norm2(x))
        return self.visual.merger(x)[self.reverse]  # (n/4, H), raster order of merged patches


class EmbeddingGraph(nn.Module):
    """Token embeddings with image features at the ``<|image_pad|>`` positions, in order.

    Row 0 of the lookup table is a zero row, so the graph needs no feature count: the i-th image
    token (cumulative count i + 1) reads feature row i, every other position reads row 0 and
    keeps its token embedding. Exact copies, like transformers' ``masked_scatter``.
    """

    def __init__(self, embed_tokens: nn.Embedding, image_token_id: int = IMAGE_TOKEN_ID) -> None:
        super().__init__()
        self.embed_tokens = embed_tokens
        self.image_token_id = image_token_id

    def forward(self, input_ids: torch.Tensor, image_features: torch.Tensor) -> torch.Tensor:
        embeds = self.embed_tokens(input_ids)  # (B, S, H)
        is_image = input_ids == self.image_token_id
        count = torch.cumsum(is_image.reshape(-1).long(), 0).reshape(input_ids.shape)
        index = torch.where(is_image, count, torch.zeros_like(count))
        pad = torch.zeros(1, self.embed_tokens.embedding_dim, dtype=image_features.dtype)
        table = torch.cat([pad, image_features])  # (1 + N, H)
        return torch.where(is_image[..., None], table[index], embeds)


def _stage_checkpoint(mllm_dir: Path, stage: Path) -> None:
    """A view of the checkpoint that ort-genai's builder accepts: published ConceptSeg-R1 configs
    name the architecture ``ConceptSegR1ForConditionalGeneration_qwen2p5``; the builder dispatches
    on ``Qwen2_5_VLForConditionalGeneration``. Weights are symlinked (the CTM keys are ignored)."""
    stage.mkdir(parents=True, exist_ok=True)
    for path in mllm_dir.iterdir():
        if path.name != "config.json":
            (stage / path.name).symlink_to(path.resolve())
    config = json.loads((mllm_dir / "config.json").read_text())
    config["architectures"] = ["Qwen2_5_VLForConditionalGeneration"]
    (stage / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def build_decoder(
    stage: Path, out: Path, precision: str, cache: Path, accuracy_level: int = 4
) -> float:
    """Run ort-genai's model builder for the text decoder, in a child process (it prints a lot),
    with its int4 pass one weight at a time (:mod:`conceptseg_export.genai_builder`: the same
    bytes, no fp32 copy of the whole decoder); returns seconds. The log goes to ``out/builder.log``, the
    builder's peak memory to ``out/builder_memory.json``. int4: symmetric RTN, blocks of 32;
    ``accuracy_level`` 4 computes with int8 activations (the CPU default, fastest), 1 with fp32
    activations."""
    options = ["exclude_embeds=true", "include_hidden_states=true", "prune_lm_head=true"]
    if precision == "int4":
        options += ["block_size=32", f"accuracy_level={accuracy_level}", "is_symmetric=true"]
    command = [sys.executable, "-m", "conceptseg_export.genai_builder", "-i", str(stage),
               "-o", str(out), "-p", precision, "-e", "cpu", "-c", str(cache),
               "--extra_options", *options]  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    with open(out / "builder.log", "w") as log:
        done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, check=False)
    if done.returncode != 0 or not (out / "model.onnx").exists():
        tail = (out / "builder.log").read_text()[-3000:]
        raise RuntimeError(f"ort-genai model builder failed ({precision}), log tail:\n{tail}")
    return time.perf_counter() - start


def genai_config(builder_config: dict[str, Any], hf_config: dict[str, Any]) -> dict[str, Any]:
    """The builder's decoder config plus the ``vision`` and ``embedding`` sections of ort-genai's
    ``qwen2_5_vl`` multimodal model. ort-genai refuses ``..`` in config paths: the shared graphs
    are symlinked into each precision's directory (:func:`_link_shared`)."""
    vision = hf_config["vision_config"]
    session = {"log_id": "onnxruntime-genai", "provider_options": []}
    config = json.loads(json.dumps(builder_config))
    model = config["model"]
    model["type"] = "qwen2_5_vl"
    model["image_token_id"] = hf_config.get("image_token_id", IMAGE_TOKEN_ID)
    model["video_token_id"] = hf_config.get("video_token_id", qwen.VIDEO_PAD_ID)
    model["vision_start_token_id"] = hf_config.get("vision_start_token_id", qwen.VISION_START_ID)
    model["vision"] = {
        "filename": "vision.onnx",
        "spatial_merge_size": vision["spatial_merge_size"],
        "tokens_per_second": float(vision.get("tokens_per_second", 2)),
        "patch_size": vision["patch_size"],
        "window_size": vision["window_size"],
        "inputs": {"pixel_values": "pixel_values", "image_grid_thw": "image_grid_thw"},
        "outputs": {"image_features": "image_features"},
        "session_options": dict(session),
    }
    model["embedding"] = {
        "filename": "embedding.onnx",
        "inputs": {"input_ids": "input_ids", "image_features": "image_features"},
        "outputs": {"inputs_embeds": "inputs_embeds"},
        "session_options": dict(session),
    }
    config["search"].update(do_sample=False, top_k=1, repetition_penalty=1.0)
    return config


def _onnx_export(module: nn.Module, feeds: dict[str, torch.Tensor], path: Path,
                 outputs: tuple[str, ...], dynamic: dict[str, dict[int, str]]) -> None:  # fmt: skip
    """Trace ``module`` to ``path`` with its weights in one ``path.name.data`` file. The tracer
    writes graphs over 2 GB with one external file per tensor; that happens in a scratch
    directory, so the output directory only ever gets the two files."""

    with tempfile.TemporaryDirectory(prefix="conceptseg-trace-") as scratch:
        traced = Path(scratch) / path.name
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer notes on shape arithmetic; parity is checked
            torch.onnx.export(module, tuple(feeds.values()), str(traced), input_names=list(feeds),
                              output_names=list(outputs), dynamic_axes=dynamic, opset_version=18,
                              dynamo=False)  # fmt: skip
        model = onnx.load(str(traced))  # external tensors, if any, are read from the scratch dir
    names = {i.name for i in model.graph.input}
    for name, tensor in feeds.items():  # the tracer drops unused inputs; the contract keeps them
        if name not in names:
            elem = onnx.helper.np_dtype_to_tensor_dtype(tensor.numpy().dtype)
            model.graph.input.append(
                onnx.helper.make_tensor_value_info(name, elem, list(tensor.shape))
            )
    for stale in path.parent.glob(f"{path.name}*"):
        stale.unlink()
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=f"{path.name}.data", size_threshold=1024)  # fmt: skip


def _ort_parity(path: Path, module: nn.Module, feeds: dict[str, torch.Tensor]) -> float:

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    wanted = {i.name for i in session.get_inputs()}
    ours = session.run(None, {k: v.numpy() for k, v in feeds.items() if k in wanted})[0]
    with torch.no_grad():
        ref = module(**feeds).numpy()
    return float(np.abs(ours.astype(np.float64) - ref).max())


def export_mm_graphs(mllm_dir: Path, out_dir: Path) -> dict[str, Any]:
    """``vision.onnx`` and ``embedding.onnx`` from the checkpoint, each checked under ORT."""

    # the checkpoint's dtype, then the two exported parts in fp32: the 3B model whole in fp32
    # would take 15 GB for the 3.3 GB that are exported here
    model = load_qwen(mllm_dir, "auto").model  # type: ignore[arg-type]
    vision = QwenVisionGraph(model.visual.float()).eval()
    embedding = EmbeddingGraph(model.get_input_embeddings().float()).eval()
    generator = torch.Generator().manual_seed(0)
    n = GRID[0] * GRID[1] * GRID[2]
    pixels = {"pixel_values": torch.randn(n, PATCH_DIM, generator=generator),
              "image_grid_thw": torch.tensor([GRID])}  # fmt: skip
    with torch.no_grad():  # the export graph against transformers' own vision forward
        ref = model.visual(pixels["pixel_values"], grid_thw=pixels["image_grid_thw"]).pooler_output
        graph_vs_hf = float((vision(**pixels) - ref).abs().max())
        features = vision(**pixels)[:7]
    ids = torch.tensor([[qwen.IM_START_ID, qwen.VISION_START_ID, IMAGE_TOKEN_ID, IMAGE_TOKEN_ID,
                         qwen.VISION_END_ID, 872, 198]] * 2)  # fmt: skip
    ids[1, 2:4] = 872  # second row: no image tokens; features go to row 0's placeholders only
    tokens = {"input_ids": ids, "image_features": features[:2]}
    t0 = time.perf_counter()
    _onnx_export(vision, pixels, out_dir / "vision.onnx", ("image_features",), {})
    _onnx_export(embedding, tokens, out_dir / "embedding.onnx", ("inputs_embeds",),
                 {"input_ids": {0: "batch_size", 1: "sequence_length"},
                  "image_features": {0: "num_image_tokens"},
                  "inputs_embeds": {0: "batch_size", 1: "sequence_length"}})  # fmt: skip
    no_image = {"input_ids": ids[1:], "image_features": features[:0]}
    return {
        "vision": {"file": "vision.onnx", "pixel_values": [n, PATCH_DIM], "grid_thw": list(GRID),
                   "image_features": [n // 4, int(ref.shape[1])],
                   "graph_vs_transformers_max_abs": graph_vs_hf,
                   "ort_vs_torch_max_abs": _ort_parity(out_dir / "vision.onnx", vision, pixels)},
        "embedding": {"file": "embedding.onnx",
                      "ort_vs_torch_max_abs": max(_ort_parity(out_dir / "embedding.onnx", embedding, f)
                                                  for f in (tokens, no_image))},
        "export_seconds": round(time.perf_counter() - t0, 2),
    }  # fmt: skip


def _link_shared(root: Path, target: Path) -> None:
    """Relative symlinks to the precision-independent graphs (and their weights)."""
    for name in ("vision.onnx", "vision.onnx.data", "embedding.onnx", "embedding.onnx.data"):
        link = target / name
        if link.is_symlink() or link.exists():
            link.unlink()
        if (root / name).exists():
            link.symlink_to(Path("..") / name)


def _copy_processor(mllm_dir: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for name in PROCESSOR_FILES:
        if (mllm_dir / name).exists():
            shutil.copy2(mllm_dir / name, dest / name)


def sample_inputs() -> tuple[list[dict[str, Any]], list[Any]]:
    """Messages and images ``[mosaic, target]`` of the bundled sample request."""

    msgs, images, _ = mllm_inputs(sample_request())
    return msgs, images


def compare_generations(ref: Any, ours: Any, forced: bool = False) -> dict[str, Any]:
    """Token agreement and hidden-state differences of two :class:`Generation` s.

    ``agreement``: matching tokens / reference tokens, position by position; ``first_mismatch``:
    index of the first differing token (None if equal). Hidden differences cover the common prefix
    (after a mismatch the sequences, and so the states, diverge by construction), or every row
    when ``ours`` was teacher-forced on ``ref``'s tokens (same inputs, step by step).
    """
    n = min(len(ref.token_ids), len(ours.token_ids))
    same = [a == b for a, b in zip(ref.token_ids, ours.token_ids, strict=False)]
    first = next((i for i, s in enumerate(same) if not s), None)
    if first is None and len(ref.token_ids) != len(ours.token_ids):
        first = n
    common = n if first is None or forced else first
    delta = np.abs(ref.hidden[:common].astype(np.float64) - ours.hidden[:common])
    return {
        "tokens": len(ref.token_ids),
        "tokens_equal": ref.token_ids == ours.token_ids,
        "agreement": round(sum(same) / max(len(ref.token_ids), 1), 4),
        "first_mismatch": first,
        "hidden_max_abs": float(delta.max(initial=0.0)),
        "hidden_mean_abs": float(delta.mean()) if delta.size else 0.0,
        "prefill_ms": {"hf": round(ref.prefill_ms, 1), "ours": round(ours.prefill_ms, 1)},
        "decode_ms": {"hf": round(ref.decode_ms, 1), "ours": round(ours.decode_ms, 1)},
    }


def verify(mllm_dir: Path, root: Path, precisions: tuple[str, ...], tokens: int) -> dict[str, Any]:
    """Greedy ``tokens`` tokens on the bundled sample request, hf backend (fp32) vs ort-genai per
    precision: free running, and teacher-forced on the hf tokens (per-step agreement; states of
    the same sequence). One model in memory at a time (the 3B pair would not fit in 24 GB)."""

    msgs, images = sample_inputs()
    ref = HfMllm(mllm_dir, max_new_tokens=tokens).generate(msgs, images)
    gc.collect()
    report = {}
    for precision in precisions:
        backend = OrtGenaiMllm(root / precision, max_new_tokens=tokens)
        forced = backend.decode(msgs, images, forced=ref.token_ids)
        report[precision] = {
            "free_running": compare_generations(ref, backend.generate(msgs, images)),
            "teacher_forced": compare_generations(ref, forced, forced=True),
        }
        del backend
        gc.collect()
    return report


def export_mllm(
    mllm_dir: Path,
    out_dir: Path,
    precisions: tuple[str, ...] = PRECISIONS,
    verify_tokens: int = 24,
) -> dict[str, Any]:
    """Export the MLLM of ``mllm_dir`` into ``out_dir/mllm``; returns the manifest entries for
    ``manifest.json``'s graph table: ``{"mllm": "mllm/mllm.json"}`` (that file holds the graphs,
    decoders, parity figures and versions). ``verify_tokens``: greedy tokens compared with the
    hf backend per precision (0 skips it; at the real 3B size on a CPU it takes minutes)."""
    import onnxruntime_genai as og  # optional: the ort-genai backend

    unknown = sorted(set(precisions) - set(PRECISIONS))
    assert not unknown, f"precisions {unknown} are not among {PRECISIONS}"
    if og.__version__ != GENAI_VERSION:
        raise UsageError(
            "onnxruntime-genai",
            f"{og.__version__} installed; the export is written for {GENAI_VERSION} "
            "(make install reinstalls the pinned version)",
        )
    mllm_dir, root = Path(mllm_dir), Path(out_dir) / "mllm"
    root.mkdir(parents=True, exist_ok=True)
    hf_config = json.loads((mllm_dir / "config.json").read_text())
    record: dict[str, Any] = {"graphs": export_mm_graphs(mllm_dir, root), "decoders": {}}
    gc.collect()  # the torch model: the builder's own process loads the checkpoint again
    _copy_processor(mllm_dir, root / "processor")
    with tempfile.TemporaryDirectory(prefix="conceptseg-genai-") as tmp:
        stage = Path(tmp) / "checkpoint"
        _stage_checkpoint(mllm_dir, stage)
        for precision in precisions:
            target = root / precision
            seconds = build_decoder(stage, target, precision, Path(tmp) / "cache")
            built = json.loads((target / "genai_config.json").read_text())
            config = genai_config(built, hf_config)
            (target / "genai_config.json").write_text(json.dumps(config, indent=4) + "\n")
            _link_shared(root, target)
            memory = json.loads((target / genai_builder.MEMORY_FILE).read_text())
            record["decoders"][precision] = {"dir": precision, "build_seconds": round(seconds, 2),
                                             "builder_memory": memory}  # fmt: skip
    if verify_tokens:
        for precision, figures in verify(mllm_dir, root, precisions, verify_tokens).items():
            record["decoders"][precision]["vs_hf"] = figures
    record.update(_provenance(mllm_dir))
    (root / "mllm.json").write_text(json.dumps(record, indent=2) + "\n")
    return {"mllm": "mllm/mllm.json"}


def _provenance(mllm_dir: Path) -> dict[str, Any]:
    import onnxruntime_genai as og  # optional: the ort-genai backend


    return {
        "source": str(mllm_dir.resolve()),
        "source_sha256": sha256_files(safetensors_files(mllm_dir)),
        "image_side": 588,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "versions": export_versions() | {"onnxruntime_genai": og.__version__},
    }


@dataclass
class MllmExportConfig:
    """Export the MLLM part of a checkpoint for the ort-genai backend."""

    weights: Path = field(metadata={"help": "directory with the mllm/ checkpoint"})
    out: Path = field(metadata={"help": "engines directory (writes OUT/mllm/...)"})
    precisions: tuple[str, ...] = field(
        default=PRECISIONS, metadata={"help": "decoder precisions: fp32 int4"}
    )
    verify_tokens: int = field(
        default=24, metadata={"help": "greedy tokens compared with transformers (0: skip)"}
    )


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    cli_args.add_cli_args(parser, MllmExportConfig)


def from_cli_args(args: argparse.Namespace) -> MllmExportConfig:
    return cli_args.from_cli_args(args, MllmExportConfig)


def main(cfg: MllmExportConfig) -> Path:
    """``cfg.weights/mllm`` -> ``cfg.out/mllm``; prints the parity figures, returns ``cfg.out``."""
    entries = export_mllm(
        Path(cfg.weights) / "mllm", Path(cfg.out), cfg.precisions, cfg.verify_tokens
    )
    record = json.loads((Path(cfg.out) / entries["mllm"]).read_text())
    print(json.dumps({k: record[k] for k in ("graphs", "decoders")}, indent=2))
    return Path(cfg.out)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_cli_args(parser)
    main(from_cli_args(parser.parse_args()))
