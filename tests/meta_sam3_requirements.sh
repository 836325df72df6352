#!/usr/bin/env bash
# Test-only install of Meta's SAM 3 package (for tests/models/test_meta_fidelity.py).
#
# sam3 0.1.4 pins numpy<2.4, typing_extensions<4.16, huggingface-hub<2 and tqdm<4.68, which
# conflict with the runtime's pins, so it is installed WITHOUT its declared dependencies, plus
# what `import sam3.model_builder` really needs and the venv lacks, each also with --no-deps
# (they need only numpy, tqdm and typing_extensions, which the venv has). Nothing installed is
# upgraded or downgraded (torch, transformers and numpy stay as the install resolved them);
# `pip check` afterwards lists only sam3's own unmet pins. Idempotent: when every pin is already
# installed it exits at once, without pip.
# Usage, from the repository root after `make install`: bash tests/meta_sam3_requirements.sh
set -euo pipefail

PIP="${PIP:-.venv/bin/pip}"
PY="${PY:-.venv/bin/python}"
# sam3 itself (the CLIP BPE file it needs ships in open_clip_torch, already a dependency), then
# its import-time needs: iopath (+ portalocker) for checkpoint I/O, einops for RoPE, pycocotools
# for the data loaders and psutil for the video predictor (psutil is undeclared by sam3).
PINS=(sam3==0.1.4 iopath==0.1.10 portalocker==4.4.2 einops==0.8.2 pycocotools==2.0.11 psutil==7.2.2)

all_installed() {
    "$PY" -c '
import sys
from importlib.metadata import PackageNotFoundError, version

try:
    sys.exit(any(version(n) != v for n, v in (p.split("==") for p in sys.argv[1:])))
except PackageNotFoundError:
    sys.exit(1)
' "${PINS[@]}"
}

if all_installed; then
    echo "sam3 test dependencies already installed"
    exit 0
fi
BEFORE=$("$PY" -c 'import numpy; print(numpy.__version__)')
"$PIP" install -q --no-deps "${PINS[@]}"
"$PY" -W ignore -c '
import sys
import numpy, torch, transformers
from sam3.model_builder import build_sam3_image_model

assert numpy.__version__ == sys.argv[1], f"numpy changed from {sys.argv[1]} to {numpy.__version__}"
print(f"sam3 ready: torch {torch.__version__}, transformers {transformers.__version__}, numpy {numpy.__version__}")
' "$BEFORE"
