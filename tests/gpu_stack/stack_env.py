"""The container-equivalent Python environment: ``.venv-gpu-stack/`` (git-ignored), built once.

Python 3.12 (pyenv's, as the NGC release runs ``python`` of ``gpu_stack.toml``) with the
container's versions of what the gpu-profile code imports: transformers at the stack's version
and ``[container] requirements`` (numpy<2, pillow, tokenizers). Then this package is installed
as ``docker/Dockerfile`` installs it: ``pip install --constraint <the env's own freeze> .``, so
pip fails instead of replacing a container package. No torch, tensorrt or tensorrt_llm: the
fakes in ``fakes/`` stand in (tests/gpu_stack/test_container_env.py says why).

Re-running is a no-op while the stamps match: the env's (stack file, this file) and the
package's (pyproject.toml and every file of the three packages): an edit reinstalls the
package only, in seconds.

Run: .venv/bin/python tests/gpu_stack/stack_env.py [--out .venv-gpu-stack]
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STACK = ROOT / "runtime" / "conceptseg" / "gpu_stack.toml"
DEFAULT_OUT = ROOT / ".venv-gpu-stack"
PACKAGES = ("runtime/conceptseg", "export/conceptseg_export", "triton_repo/conceptseg_triton")


def requirements() -> list[str]:
    """The container's packages, as pip requirements, from gpu_stack.toml."""
    stack = tomllib.loads(STACK.read_text())
    return [f"transformers=={stack['components']['transformers']}",
            *stack.get("container", {}).get("requirements", [])]  # fmt: skip


def python312() -> Path:
    """pyenv's Python of the stack's major.minor (``$PYTHON312`` overrides)."""
    if os.environ.get("PYTHON312"):
        return Path(os.environ["PYTHON312"])
    minor = ".".join(tomllib.loads(STACK.read_text())["components"]["python"].split(".")[:2])
    root = subprocess.run(["pyenv", "root"], capture_output=True, text=True).stdout.strip()
    found = sorted(glob.glob(f"{root or os.path.expanduser('~/.pyenv')}/versions/{minor}*/bin/python{minor}"))
    if not found:
        raise SystemExit(f"no Python {minor} under pyenv; install it: pyenv install {minor}")
    return Path(found[-1])


def _digest(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def env_stamp() -> str:
    return _digest([STACK, Path(__file__).resolve()])


def package_stamp() -> str:
    files = [ROOT / "pyproject.toml"] + sorted(
        p for d in PACKAGES for p in (ROOT / d).rglob("*") if p.is_file() and "__pycache__" not in p.parts
    )
    return _digest(files)


def _current(marker: Path, value: str) -> bool:
    return marker.is_file() and marker.read_text() == value


def up_to_date(out: Path) -> bool:
    return _current(out / ".env", env_stamp()) and _current(out / ".installed", package_stamp())


def build(out: Path = DEFAULT_OUT) -> Path:
    """Create (or re-use) the env; returns its python."""
    python = out / "bin" / "python"
    pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    constraints = out / "container-constraints.txt"
    if not _current(out / ".env", env_stamp()):
        shutil.rmtree(out, ignore_errors=True)
        subprocess.run([str(python312()), "-m", "venv", str(out)], check=True)
        subprocess.run([*pip, *requirements()], check=True)
        freeze = subprocess.run([str(python), "-m", "pip", "list", "--format=freeze"], check=True,
                                capture_output=True, text=True).stdout  # fmt: skip
        constraints.write_text(freeze)
        (out / ".env").write_text(env_stamp())
    if not _current(out / ".installed", package_stamp()):
        # as docker/Dockerfile: the container's packages are constraints, never replaced
        subprocess.run([*pip, "--constraint",
                        str(constraints), str(ROOT)], check=True)  # fmt: skip
        (out / ".installed").write_text(package_stamp())
    return python


if __name__ == "__main__":
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("--out", type=Path, default=DEFAULT_OUT)
    print(build(cli.parse_args().out))
    sys.exit(0)
