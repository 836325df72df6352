"""The import rules `make lint`'s import-linter cannot see: function-local imports are kept for
optional heavy dependencies (and, in the composition roots, the backend a flag chooses), each
with its reason on the line; every module of the three packages imports on its own.

Run: .venv/bin/pytest tests/unit/test_imports.py -q
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = (ROOT / "runtime" / "conceptseg", ROOT / "export" / "conceptseg_export")
# optional or heavy dependencies a light path exists without (STYLE.md, section 0)
LAZY_OK = {"tensorrt", "tensorrt_llm", "modelopt", "onnxruntime_genai", "tritonclient", "torch",
           "transformers", "onnx", "onnxruntime", "torchvision", "safetensors", "scipy",
           "matplotlib", "cProfile", "pstats", "openvino"}  # fmt: skip
# composition roots: they may import a chosen backend (or the exporters) when it is chosen
ROOTS = {"cli.py", "build.py"}


def function_local_imports(path: Path) -> list[tuple[int, int | None, str]]:
    tree = ast.parse(path.read_text())
    found = []
    for fn in ast.walk(tree):
        if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
            for node in ast.walk(fn):
                if isinstance(node, ast.Import):
                    found += [(node.lineno, node.end_lineno, a.name) for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module:
                    found.append((node.lineno, node.end_lineno, node.module))
    return found


def sources() -> list[Path]:
    return sorted(p for package in PACKAGES for p in package.rglob("*.py"))


@pytest.mark.parametrize("path", sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_function_local_imports_are_lazy_for_a_reason(path: Path):
    lines = path.read_text().splitlines()
    for lineno, end, module in function_local_imports(path):
        root = module.split(".")[0]
        ours = root in ("conceptseg", "conceptseg_export")
        allowed = root in LAZY_OK or (ours and path.name in ROOTS)
        assert allowed, f"{path.name}:{lineno}: `{module}` imported in a function; import it at the top"
        statement = "".join(lines[lineno - 1 : end or lineno])
        assert "#" in statement, f"{path.name}:{lineno}: lazy `{module}` needs its reason"


def module_names() -> list[str]:
    names = []
    for path in sources():
        rel = path.relative_to(ROOT / ("runtime" if "runtime" in path.parts else "export"))
        parts = rel.with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


@pytest.mark.parametrize("name", module_names())
def test_every_module_imports_on_its_own(name: str):
    """A module importable only after another (a hidden cycle, a missing import) fails here."""
    importlib.import_module(name)
