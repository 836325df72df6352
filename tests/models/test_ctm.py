"""The CTM: reference structure, key masking for batches. Run: .venv/bin/pytest tests/models/test_ctm.py -q"""

import torch
import torch.nn.functional as F

from conceptseg.checkpoints import nn_init_ctm
from conceptseg.models.ctm import ConceptTranslationModule


def _ctm(q=4, h=32):
    ctm = ConceptTranslationModule(q, h)
    nn_init_ctm(ctm, seed=3)
    return ctm.eval()


def test_state_dict_names_are_the_reference_names():
    keys = set(_ctm().state_dict())
    assert {
        "learnable_query.param.weight",
        "connector.pos_embed",
        "proj_to_sam.0.weight",
        "proj_to_sam.2.bias",
        "connector.blocks.3.attn.kv.weight",
        "connector.blocks.0.norm0.bias",
        "connector.blocks.2.mlp.fc2.weight",
    } <= keys
    assert len(keys) == 2 + 4 * 16 + 4


def test_matches_an_independent_reference_formula():
    """Written out from METHOD.md section 5, unbatched and unmasked."""
    torch.manual_seed(0)
    ctm, h = _ctm(), torch.randn(1, 7, 32)
    sd = ctm.state_dict()
    query = sd["learnable_query.param.weight"] + sd["connector.pos_embed"][0]
    for i in range(4):
        p = {k.split(f"blocks.{i}.")[1]: v for k, v in sd.items() if f"blocks.{i}." in k}
        x = F.layer_norm(query, (32,), p["norm0.weight"], p["norm0.bias"], 1e-6)
        keys = F.layer_norm(h[0], (32,), p["norm1.weight"], p["norm1.bias"], 1e-6)
        q = (x @ p["attn.q.weight"].T + p["attn.q.bias"]).view(4, 16, 2).transpose(0, 1)
        kv = keys @ p["attn.kv.weight"].T + p["attn.kv.bias"]
        k, v = kv[:, :32].view(7, 16, 2).transpose(0, 1), kv[:, 32:].view(7, 16, 2).transpose(0, 1)
        att = torch.softmax(q @ k.transpose(1, 2) / 2**0.5, -1) @ v  # (16, 4, 2)
        query = (
            query
            + att.transpose(0, 1).reshape(4, 32) @ p["attn.proj.weight"].T
            + p["attn.proj.bias"]
        )
        y = (
            F.layer_norm(query, (32,), p["norm2.weight"], p["norm2.bias"], 1e-6)
            @ p["mlp.fc1.weight"].T
            + p["mlp.fc1.bias"]
        )
        query = query + (y * torch.sigmoid(1.702 * y)) @ p["mlp.fc2.weight"].T + p["mlp.fc2.bias"]
    out = (
        F.gelu(query @ sd["proj_to_sam.0.weight"].T + sd["proj_to_sam.0.bias"])
        @ sd["proj_to_sam.2.weight"].T
    )
    out = out + sd["proj_to_sam.2.bias"]
    with torch.inference_mode():
        torch.testing.assert_close(ctm(h)[0], out, rtol=1e-5, atol=1e-5)


def test_batched_with_padding_equals_one_by_one():
    torch.manual_seed(1)
    ctm = _ctm()
    lengths = [5, 12, 1]
    seqs = [torch.randn(n, 32) for n in lengths]
    batch = torch.full((3, 12, 32), 1e3)  # garbage in padded keys must not matter
    mask = torch.zeros(3, 12, dtype=torch.long)
    for i, s in enumerate(seqs):
        batch[i, : len(s)], mask[i, : len(s)] = s, 1
    with torch.inference_mode():
        batched = ctm(batch, mask)
        for i, s in enumerate(seqs):
            torch.testing.assert_close(batched[i], ctm(s[None])[0], rtol=1e-5, atol=1e-5)
