"""Synthetic checkpoints in the published layouts and the loaders that read them.

Run: .venv/bin/pytest tests/models/test_checkpoints.py -q
"""

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from conceptseg.checkpoints import (
    MLLM_SIZES,
    load_ctm,
    mllm_config,
    read_tensors,
    sam3_config,
    synth,
)
from conceptseg.models.ctm import ConceptTranslationModule
from conceptseg.types import RequestError, UsageError
from conceptseg.weights import check_weights


def test_layout_and_key_prefixes(tiny_weights):
    mllm, sam3 = check_weights(tiny_weights)
    for name in [
        "config.json",
        "generation_config.json",
        "preprocessor_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "model.safetensors",
    ]:
        assert (mllm / name).exists(), name
    with safe_open(str(mllm / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    # published (transformers 4.51) names for the MLLM, reference names for the CTM, nothing else
    assert {k.split(".")[0] for k in keys} == {
        "model",
        "visual",
        "learnable_query",
        "connector",
        "proj_to_sam",
    }
    assert "learnable_query.param.weight" in keys and "connector.pos_embed" in keys
    assert "model.layers.0.self_attn.q_proj.weight" in keys and "visual.merger.mlp.0.weight" in keys
    assert json.loads((sam3 / "config.json").read_text())["model_type"] == "sam3"


def test_ctm_shapes_come_from_tensors(tiny_weights):
    ctm = load_ctm(tiny_weights / "mllm")
    assert ctm.num_queries == 8 and ctm.learnable_query.param.weight.shape == (8, 64)
    assert len(ctm.connector.blocks) == 4
    state = read_tensors(tiny_weights / "mllm", ("connector.pos_embed",))
    assert torch.equal(state["connector.pos_embed"], ctm.connector.pos_embed.detach())


def test_mllm_loads_all_published_keys(tiny_weights):
    from conceptseg.backends.hf_mllm import load_qwen

    model = load_qwen(tiny_weights / "mllm", torch.float32)
    stored = read_tensors(tiny_weights / "mllm", ("model.", "visual."))
    current = model.state_dict()
    for key, value in stored.items():
        name = "model.language_model." + key[6:] if key.startswith("model.") else "model." + key
        assert torch.equal(current[name], value), key


def test_synth_is_deterministic(tmp_path, tiny_weights):
    again = synth(tmp_path / "again", "tiny", seed=0)
    for part in ("mllm", "sam3"):
        a = (tiny_weights / part / "model.safetensors").read_bytes()
        assert a == (again / part / "model.safetensors").read_bytes(), part


def test_real_size_architectures():
    """The real-3b configs have the published sizes (built on the meta device: no memory)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Sam3Model

    with torch.device("meta"):
        qwen = Qwen2_5_VLForConditionalGeneration(
            Qwen2_5_VLConfig.from_dict(mllm_config(MLLM_SIZES["real-3b"]))
        )
        sam = Sam3Model(sam3_config("real-3b"))
    assert 3.7e9 < sum(p.numel() for p in qwen.parameters()) < 3.8e9
    assert sum(p.numel() for p in sam.parameters()) == 840_376_374
    assert len(sam.state_dict()) == 1468
    assert sam3_config("real-3b").vision_config.backbone_config.layer_norm_eps == 1e-5  # Meta's


def test_bad_weight_dirs(tmp_path, tiny_weights):
    with pytest.raises(UsageError, match="--weights: .* is not a directory"):
        check_weights(tmp_path / "nope")
    (tmp_path / "empty" / "mllm").mkdir(parents=True)
    with pytest.raises(UsageError, match=r"--weights \(mllm\): .* lacks config.json"):
        check_weights(tmp_path / "empty")
    swapped = tmp_path / "swapped"
    shutil.copytree(tiny_weights / "sam3", swapped / "mllm")
    shutil.copytree(tiny_weights / "sam3", swapped / "sam3")
    for name in ("tokenizer_config.json", "preprocessor_config.json"):
        (swapped / "mllm" / name).write_text("{}")
    with pytest.raises(UsageError, match="model_type 'sam3', expected 'qwen2_5_vl'"):
        check_weights(swapped)
    with pytest.raises(RequestError, match="no CTM weights"):
        load_ctm(swapped / "mllm")


def test_sharded_checkpoints_read_back_whole(tmp_path):
    """save_sharded splits at the byte budget into HF's file names + index; every tensor reads back."""
    from conceptseg.checkpoints import save_sharded
    from conceptseg.weights import safetensors_files

    tensors = {f"model.layers.{i}.weight": torch.full((64, 64), float(i)) for i in range(6)}
    save_sharded(tensors, tmp_path, max_bytes=40_000)  # 16 KiB each: two per shard
    files = safetensors_files(tmp_path)
    assert [f.name for f in files] == [f"model-{i:05d}-of-00003.safetensors" for i in (1, 2, 3)]
    back = read_tensors(tmp_path, ("model.",))
    assert sorted(back) == sorted(tensors)
    assert all(torch.equal(back[k], v) for k, v in tensors.items())


# Published totals (HF safetensors metadata of Qwen2.5-VL-3B/7B-Instruct): 3.75 B and 8.29 B.
PUBLISHED = {"real-3b": (3_754_622_976, 2048, 36, 16, 2, 11008, 151936, True),
             "real-7b": (8_292_166_656, 3584, 28, 28, 4, 18944, 152064, False)}  # fmt: skip


@pytest.mark.parametrize("size", sorted(PUBLISHED))
def test_real_sizes_match_the_published_shapes_on_the_meta_device(size):
    """``synth --size real-3b/real-7b``'s configs, instantiated without weights (meta device):
    the parameter count and shapes of the published Qwen2.5-VL, the CTM at the MLLM's width."""
    total, hidden, layers, heads, kv, inter, vocab, tied = PUBLISHED[size]
    spec = MLLM_SIZES[size]
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig.from_dict(mllm_config(spec)))
        ctm = ConceptTranslationModule(spec.num_queries, spec.hidden)
    text = model.config.text_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads,
            text.num_key_value_heads, text.intermediate_size, text.vocab_size) == (
        hidden, layers, heads, kv, inter, vocab)  # fmt: skip
    assert model.config.tie_word_embeddings is tied
    assert sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()) == total
    assert model.model.visual.merger.mlp[-1].out_features == hidden
    assert spec.num_queries == 8 and ctm.proj_to_sam[2].in_features == hidden
    ctm_params = sum(p.numel() for p in ctm.parameters())
    assert ctm_params == pytest.approx(49.2 * hidden**2, rel=0.01)  # 7B: ~0.63 B (METHOD.md: ~0.62)
    assert sam3_config(size).vision_config.backbone_config.hidden_size == 1024  # the one SAM 3
