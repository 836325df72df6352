"""The reference SAM 3 backend on the tiny checkpoint. Run: .venv/bin/pytest tests/models/test_torch_sam3.py -q"""

import numpy as np
import pytest
import torch

from conceptseg.backends.torch_ref import TorchSam3
from conceptseg.samples import sample_target


@pytest.fixture(scope="module")
def sam3(tiny_weights):
    return TorchSam3(tiny_weights / "sam3")


def test_tokenizer_real_clip_vocab_and_meta_cleaning(sam3):
    ids, mask = sam3.tokenize("a red car")
    assert ids.shape == mask.shape == (1, 32)
    assert ids[0, :5].tolist() == [49406, 320, 736, 1615, 49407] and mask.sum() == 5
    # Meta cleans text (ftfy, HTML entities, whitespace, case) before BPE
    assert np.array_equal(sam3.tokenize("  A RED&amp;car ")[0], sam3.tokenize("a red&car")[0])
    long_ids, long_mask = sam3.tokenize("word " * 100)
    assert long_mask.sum() == 32 and long_ids[0, -1] == 49407, (
        "over-long text is truncated, EOS kept"
    )


def test_image_features_are_reused_bit_identically(sam3):
    features = sam3.encode_image(sample_target())
    a = sam3.segment(features, "mug")
    b = sam3.segment(features, "mug")
    again = sam3.segment(sam3.encode_image(sample_target()), "mug")
    assert np.array_equal(a.semantic_logits, b.semantic_logits) and a.presence == b.presence
    assert np.array_equal(a.semantic_logits, again.semantic_logits)
    assert a.semantic_logits.shape == (32, 32) and 0 < a.presence < 1
    assert np.all(np.diff(a.scores) <= 0), "queries are sorted by score"


def test_concept_tokens_change_the_output_and_order_is_irrelevant(sam3):
    features = sam3.encode_image(sample_target())
    concept = np.random.default_rng(0).standard_normal((8, 256)).astype(np.float32)
    plain, with_concept = sam3.segment(features, "mug"), sam3.segment(features, "mug", concept)
    assert np.abs(plain.semantic_logits - with_concept.semantic_logits).max() > 1e-3
    reordered = sam3.segment(features, "mug", concept[::-1].copy())
    np.testing.assert_allclose(reordered.semantic_logits, with_concept.semantic_logits, atol=1e-5)


def test_text_features_are_cached(sam3):
    a = sam3.text_features("a blue mug")
    assert sam3.text_features("a blue mug")[0] is a[0]


def test_padding_box_is_part_of_every_prompt(sam3):
    """Meta's structure: the geometry encoder always runs; without the padding box the result differs."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    features = sam3.encode_image(sample_target())
    feats, mask = sam3.text_features("mug")
    with torch.inference_mode():
        no_box = sam3.model(
            vision_embeds=features.vision,
            attention_mask=mask,
            text_embeds=BaseModelOutputWithPooling(pooler_output=feats),
        )
    ours = sam3.segment(features, "mug")
    assert abs(torch.sigmoid(no_box.presence_logits[0, 0]).item() - ours.presence) > 1e-6


def test_bf16_image_encoder_is_close_to_fp32_and_hands_fp32_features(sam3, tiny_weights):
    """``--backend torch --sam3-precision bf16``: autocast in the image encoder only; the heads
    get fp32 features, and the features stay near fp32's (bf16 keeps ~3 significant digits)."""
    bf16 = TorchSam3(tiny_weights / "sam3", precision="bf16")
    image = sample_target()
    ref, low = sam3.encode_image(image), bf16.encode_image(image)
    for a, b in zip(ref.vision.fpn_hidden_states[:3], low.vision.fpn_hidden_states[:3], strict=True):
        assert b.dtype == torch.float32
        rel = float((a - b).norm() / a.norm())
        assert 0 < rel < 0.05, f"bf16 features {rel:.2e} relative L2 from fp32"
    assert bf16.segment(low, "mug").semantic_logits.dtype == np.float32
