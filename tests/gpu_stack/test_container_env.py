"""The gpu profile in a container-equivalent Python: what NGC's Triton + TensorRT-LLM release
(``conceptseg/gpu_stack.toml``) would do with this package, checked here without the image.

``.venv-gpu-stack`` (``stack_env.py``, built once by ``make install`` or by the first test): pyenv's
Python 3.12, transformers at the stack's version, numpy<2, pillow, tokenizers, jinja2; the
package installed as ``docker/Dockerfile`` installs it, with that env's packages as constraints.

Stand-ins (``fakes/``): ``tensorrt_llm`` (the release's API as the glue uses it), ``tensorrt``
(its version) and, for the ``mllm`` stub only, ``torch``. Not a real torch: the container's
build is on no index, download.pytorch.org is unreachable from here and PyPI's cp312 torch is
the CUDA build with about 3 GB of nvidia wheels; and the orchestrator's stub must not import
torch at all, which a torch-free env proves. transformers 4.57's Qwen2.5-VL processor needs
torchvision for its video part, so the ``mllm`` stub runs the real tokenizer, chat template and
image processor of that transformers with the processor's own pad expansion
(``fakes/qwen_processor.py``).

Each Triton model runs in its own process, as stubs do: the ``mllm`` model.py (trtllm backend)
answers one request; the ``conceptseg`` model.py (gpu profile) runs a request end to end, its
BLS calls answered by numpy stand-ins of the four plans and by that generation.

Run: .venv/bin/pytest tests/gpu_stack -q
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import stack_env as venv

HERE = Path(__file__).resolve().parent
DRIVER = HERE / "driver.py"


@pytest.fixture(scope="session")
def stack_python() -> Path:
    """The container-equivalent env's python (built or re-used)."""
    return venv.build(Path(os.environ.get("GPU_STACK_VENV", venv.DEFAULT_OUT)))


@pytest.fixture(scope="session")
def work(tiny_weights, tmp_path_factory) -> Path:
    """WORK/mllm: the tiny MLLM checkpoint (its config, tokenizer and processor files)."""
    work = tmp_path_factory.mktemp("gpu-stack")
    shutil.copytree(tiny_weights / "mllm", work / "mllm")
    (work / "weights").symlink_to(tiny_weights)
    return work


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without its PYTHONPATH (the env sees its installed package)."""
    return {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, **extra}


def drive(python: Path, mode: str, work: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(python), str(DRIVER), mode, str(work)], capture_output=True,
                          text=True, cwd=work, env=clean_env(**env), timeout=120)  # fmt: skip


def test_container_packages_are_the_stacks_and_consistent(stack_python):
    stack = tomllib.loads(venv.STACK.read_text())
    code = "import sys, numpy, transformers; print(sys.version.split()[0], numpy.__version__, transformers.__version__)"
    out = subprocess.run([str(stack_python), "-c", code], capture_output=True, text=True, check=True, env=clean_env())
    python, numpy, transformers = out.stdout.split()
    assert python.rsplit(".", 1)[0] == stack["components"]["python"].rsplit(".", 1)[0]
    assert transformers == stack["components"]["transformers"] and numpy.startswith("1.")
    check = subprocess.run([str(stack_python), "-m", "pip", "check"], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_gpu_stubs_run_a_request_end_to_end_on_the_container_packages(stack_python, work):
    mllm = drive(stack_python, "mllm", work)
    assert mllm.returncode == 0, f"mllm stub failed:\n{mllm.stderr[-3000:]}"
    assert json.loads(mllm.stdout.strip().splitlines()[-1])["mllm"] == "ok"
    assert "overridden to 1" in mllm.stderr, "an inherited TLLM_WORKER_USE_SINGLE_PROCESS=0 is fixed, loudly"
    orchestrator = drive(stack_python, "orchestrator", work)
    assert orchestrator.returncode == 0, f"orchestrator stub failed:\n{orchestrator.stderr[-3000:]}"
    result = json.loads(orchestrator.stdout.strip().splitlines()[-1])
    assert result["answer"] == "the mug" and result["mask_shape"] == [400, 800], result


def _installed_copy(stack_python: Path, dst: Path) -> Path:
    """A copy of the installed ``conceptseg`` package under ``dst`` (for PYTHONPATH)."""
    code = "import conceptseg, pathlib; print(pathlib.Path(conceptseg.__file__).parent)"
    src = subprocess.run([str(stack_python), "-c", code], capture_output=True, text=True,
                         check=True, env=clean_env()).stdout.strip()  # fmt: skip
    shutil.copytree(src, dst / "conceptseg")
    return dst / "conceptseg"


def test_the_check_fails_when_the_orchestrator_imports_torch(stack_python, work, tmp_path):
    package = _installed_copy(stack_python, tmp_path)
    module = package / "serving" / "orchestrator.py"
    source = module.read_text()
    anchor = "from __future__ import annotations\n"
    assert anchor in source, "the injection point moved"
    module.write_text(source.replace(anchor, anchor + "\nimport torch\n", 1))
    (work / "mllm.npz").exists() or drive(stack_python, "mllm", work)
    run = drive(stack_python, "orchestrator", work, PYTHONPATH=str(tmp_path))
    assert run.returncode != 0 and "No module named 'torch'" in run.stderr, run.stderr[-2000:]


def _project_copy(dst: Path, edit: tuple[str, str]) -> Path:
    """This project's source tree under ``dst`` with one pyproject.toml edit."""
    root = venv.ROOT
    for folder in ("runtime", "export", "triton_repo"):
        shutil.copytree(root / folder, dst / folder,
                        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))  # fmt: skip
    text = (root / "pyproject.toml").read_text()
    assert edit[0] in text, f"{edit[0]!r} not in pyproject.toml"
    (dst / "pyproject.toml").write_text(text.replace(edit[0], edit[1], 1))
    return dst


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (('requires-python = ">=3.11,<3.13"', 'requires-python = ">=3.11,<3.12"'), "requires a different Python"),
        (('"numpy>=1.26,<2.5"', '"numpy>=2.0,<2.5"'), "conflict"),
        (('"tokenizers>=0.22,<0.24"', '"tokenizers==0.23.3"'), "conflict"),
    ],
    ids=["python-pin", "numpy-pin", "tokenizers-pin"],
)
def test_the_install_fails_when_a_pin_conflicts_with_the_container(stack_python, tmp_path, edit, message):
    project = _project_copy(tmp_path / "project", edit)
    constraints = stack_python.parents[1] / "container-constraints.txt"
    run = subprocess.run([str(stack_python), "-m", "pip", "install", "--dry-run", "-q",
                          "--constraint", str(constraints), str(project)],
                         capture_output=True, text=True, timeout=300, env=clean_env())  # fmt: skip
    assert run.returncode != 0 and message in (run.stdout + run.stderr), run.stdout + run.stderr[-2000:]


def test_the_glue_registers_without_replacing_stock_entries(stack_python, work):
    """Defects (a), (b): no QWEN2_5_VL_VISION_MODEL_CLASS in the fake (newer releases), and the
    stock qwen2_5_vl placeholder entry survives (the mllm driver asserts it)."""
    code = ("import sys; sys.path[:0] = [sys.argv[1]]\n"
            "from conceptseg.backends import trtllm_mllm as t\n"
            "from tensorrt_llm._torch.models import modeling_qwen2vl as q\n"
            "cls = t.register_model_class(); assert t.register_model_class() is cls\n"
            "assert q.VISION_ENCODERS[cls][1] is q.Qwen2_5_VisionModel\n"
            "from tensorrt_llm import inputs as i\n"
            "assert i.MULTIMODAL_PLACEHOLDER_REGISTRY.get_placeholder_metadata('qwen2_5_vl') is i.STOCK_QWEN2_5_VL\n")  # fmt: skip
    run = subprocess.run([str(stack_python), "-c", code, str(HERE / "fakes")], capture_output=True,
                         text=True, env=clean_env())  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
