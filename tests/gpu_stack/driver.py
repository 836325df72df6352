"""Runs inside the container-equivalent env (``.venv-gpu-stack``), one Triton stub per process.

``driver.py mllm WORK``: the installed ``mllm`` model.py with ``mllm_backend=trtllm`` on the fakes
of ``tensorrt_llm`` and ``torch``; one request; the final response's tensors -> WORK/mllm.npz.
``driver.py orchestrator WORK``: the installed ``conceptseg`` model.py (gpu profile) with no torch
and no TensorRT-LLM at all; its BLS calls answered by numpy engine stand-ins and, for ``mllm``,
by WORK/mllm.npz; one request end to end; prints the result JSON. Either fails loudly.

Run: see tests/gpu_stack/test_container_env.py (it makes WORK and calls this).
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import sys
import time
from pathlib import Path

FAKES = Path(__file__).resolve().parent / "fakes"
SCRIPT = ("<think>t</think> <rule>r</rule><check>[30, 60, 150, 120]</check> "
          "<bbox>[300, 150, 600, 450]</bbox> <answer>the mug</answer>")  # fmt: skip


def load_model(model: str):
    """``conceptseg_triton/<model>/1/model.py`` from the installed package, as Triton loads it."""
    import conceptseg_triton

    path = Path(conceptseg_triton.__file__).parent / model / "1" / "model.py"
    assert "site-packages" in str(path), f"{path}: not the installed package"
    spec = importlib.util.spec_from_file_location(f"model_{model}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.TritonPythonModel()


def args(name: str, decoupled: bool, **params: str) -> dict:
    config = {"name": name, "max_batch_size": 4,
              "parameters": {k: {"string_value": v} for k, v in params.items()}}  # fmt: skip
    if decoupled:
        config["model_transaction_policy"] = {"decoupled": True}
    return {"model_config": json.dumps(config)}


class Request:
    def __init__(self, tensors):
        import triton_python_backend_utils as pb

        self.tensors, self.sent, self.pb = tensors, [], pb

    def input(self, name):
        return None if name not in self.tensors else self.pb.Tensor(name, self.tensors[name])

    def get_response_sender(self):
        return self

    def send(self, response=None, flags=0):
        self.sent.append((response, flags))

    def is_cancelled(self):
        return False

    def timeout(self):
        return 0  # µs; 0: no deadline

    def wait_final(self, seconds: float = 60.0) -> None:
        """The models answer from their own threads: wait for the final response."""
        deadline = time.monotonic() + seconds
        while not (self.sent and self.sent[-1][1] == 1):
            assert time.monotonic() < deadline, f"no final response in {seconds} s: {self.sent}"
            time.sleep(0.01)


def final_arrays(request: Request) -> dict:
    request.wait_final()
    response, flags = request.sent[-1]
    assert flags == 1, f"last response not final: {request.sent}"
    assert not response.has_error(), response.error().message()
    return {t.name(): t.as_numpy() for t in response.output_tensors()}


def run_mllm(work: Path) -> None:
    import numpy as np
    from PIL import Image

    os.environ["TLLM_WORKER_USE_SINGLE_PROCESS"] = "0"  # an inherited 0 must not win (defect h)
    os.environ["FAKE_TRTLLM_SCRIPT"] = SCRIPT
    from qwen_processor import ImagesOnlyProcessor

    from conceptseg.models import qwen
    from conceptseg.serving import mllm

    qwen.load_processor = ImagesOnlyProcessor  # transformers' needs torchvision: see its module
    model = load_model("mllm")
    model.initialize(args("mllm", True, mllm_backend="trtllm", mllm_path=str(work / "mllm"),
                          prefix_cache="4", pipeline_config="{}"))  # fmt: skip
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "mug?"}]}]
    request = Request(mllm.to_mllm_arrays(messages, [Image.new("RGB", (64, 48), "red")]))
    assert model.execute([request]) is None
    arrays = final_arrays(request)
    np.savez(work / "mllm.npz", **arrays)
    from tensorrt_llm import inputs

    stock = inputs.MULTIMODAL_PLACEHOLDER_REGISTRY.get_placeholder_metadata("qwen2_5_vl")
    assert stock is inputs.STOCK_QWEN2_5_VL, "the stock qwen2_5_vl placeholder entry was replaced"
    text = mllm.generation_from_arrays(arrays).text
    assert text == SCRIPT, f"generation {text!r} != the script"
    print(json.dumps({"mllm": "ok", "text": text}))


def write_engines(work: Path) -> Path:
    """A minimal engines directory: the manifests the orchestrator reads and a CLIP-like
    tokenizer (a word-level one: the orchestrator only needs the tokenizers library)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    engines = work / "engines"
    (engines / "sam3_tokenizer").mkdir(parents=True, exist_ok=True)
    vocab = {"<|endoftext|>": 0, "<|startoftext|>": 1, "[UNK]": 2, "the": 3, "mug": 4}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.enable_padding(length=32, pad_id=0)
    tok.save(str(engines / "sam3_tokenizer" / "tokenizer.json"))
    manifest = {"weights": str(work / "weights"), "q_max": 8, "ctm_buckets": [128, 256, 512, 768]}
    (engines / "manifest.json").write_text(json.dumps(manifest))
    graphs = {
        "sam3_vision": (["image"], [1, 3, 32, 32], ["fpn0", "fpn1", "fpn2"]),
        "sam3_text": (["input_ids", "attention_mask"], [1, 32], ["text_features"]),
        "sam3_heads": (["fpn0"], [1], ["presence_logits", "semantic_logits", "instance_scores",
                                        "instance_boxes", "instance_masks"]),  # fmt: skip
        "ctm": (["hidden", "key_mask"], [1], ["concept"]),
    }
    for name, (inputs, shape, outputs) in graphs.items():
        spec = {"inputs": [{"name": n, "shape": shape, "dtype": "float32"} for n in inputs],
                "outputs": [{"name": n, "shape": [1], "dtype": "float32"} for n in outputs]}  # fmt: skip
        (engines / f"{name}.json").write_text(json.dumps(spec))
    return engines


def engine_routes(work: Path) -> dict:
    """numpy stand-ins of the four TensorRT plans, shaped as theirs; the mllm from mllm.npz."""
    import numpy as np

    def vision(x):
        assert x["image"].shape == (1, 3, 32, 32) and x["image"].dtype == np.float32
        return {f"fpn{i}": np.zeros((1, 8, 8 >> i, 8 >> i), np.float32) for i in range(3)}

    def heads(x):
        logits = -np.ones((1, 1, 16, 16), np.float32)
        logits[..., :8] = 1.0 if x["prompt_mask"][0, :8].any() else -1.0  # concept given: left on
        return {"presence_logits": np.full((1, 1), 3.0, np.float32), "semantic_logits": logits,
                "instance_scores": np.zeros((1, 2), np.float32),
                "instance_boxes": np.zeros((1, 2, 4), np.float32),
                "instance_masks": np.zeros((1, 2, 16, 16), np.float32)}  # fmt: skip

    def ctm(x):
        assert x["hidden"].shape[1] in (128, 256, 512, 768), x["hidden"].shape
        return {"concept": np.ones((x["hidden"].shape[0], 4, 256), np.float32)}

    generation = dict(np.load(work / "mllm.npz", allow_pickle=True))
    return {
        "sam3_vision": vision,
        "sam3_text": lambda x: {"text_features": np.zeros((1, 32, 256), np.float32)},
        "sam3_heads": heads,
        "ctm": ctm,
        "mllm": lambda x: [generation],
    }


def run_orchestrator(work: Path) -> None:
    import numpy as np
    import triton_python_backend_utils as pb
    from PIL import Image

    from conceptseg import contract

    engines = write_engines(work)
    pb.ROUTES.update(engine_routes(work))
    model = load_model("conceptseg")
    model.initialize(args("conceptseg", False, engines=str(engines), profile="gpu",
                          pipeline_config="{}", max_requests="4", max_reasoning="2"))  # fmt: skip
    image = Image.new("RGB", (800, 400), "white")
    refs = [(Image.new("RGB", (300, 200), "red"), (0.0, 0.0, 150.0, 100.0))]
    # five words: the router threshold is over 1, so the probe cannot accept and the MLLM runs
    request = Request(contract.to_request_arrays(image, "the mug on the left", refs))
    assert model.execute([request]) is None  # answered through the request's sender
    arrays = final_arrays(request)
    result = json.loads(bytes(arrays["result"].ravel()[0]))
    from PIL import Image as PILImage

    mask = np.asarray(PILImage.open(io.BytesIO(bytes(arrays["mask"].ravel()[0]))))
    called = sorted({m for m, _ in pb.CALLS})
    assert called == ["ctm", "mllm", "sam3_heads", "sam3_text", "sam3_vision"], called
    heavy = sorted(m for m in ("torch", "transformers", "tensorrt_llm", "onnxruntime") if m in sys.modules)
    assert not heavy, f"the orchestrator's stub imported {heavy}"
    model.finalize()
    print(json.dumps({"orchestrator": "ok", "mask_shape": list(mask.shape),
                      "answer": result.get("answer"), "keys": sorted(result)}))  # fmt: skip


if __name__ == "__main__":
    mode, work = sys.argv[1], Path(sys.argv[2])
    if mode == "mllm":
        # tensorrt_llm, torch, tensorrt and the Triton stub module
        sys.path[:0] = [str(FAKES), str(FAKES / "pb_only")]
        run_mllm(work)
    else:
        # only the Triton stub module: torch / tensorrt_llm are not there, as for the real stub's
        # imports (the container has torch, but the orchestrator must not load it)
        sys.path.insert(0, str(FAKES / "pb_only"))
        run_orchestrator(work)
