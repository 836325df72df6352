"""Thin entry to the one benchmark harness, ``conceptseg bench`` (``conceptseg.benchmark``):

    .venv/bin/python benchmarks/bench.py TARGET [flags]   ==   conceptseg bench TARGET [flags]

Targets and their contenders: ``request_bench.py`` (ours vs the reference recipe),
``sam3_bench.py``, ``mllm_bench.py``, ``serve_bench.py``, ``attention_bench.py``, ``gemm_bench.py``
beside this file. The last stdout line is one JSON object (machine, versions, config, rows).
"""

from __future__ import annotations

import sys

from conceptseg.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
