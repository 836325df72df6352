"""ConceptSeg-R1 inference runtime: reference pipeline, exported engines, Triton serving.

The pure core (``tags``, ``router``, ``mosaic``, ``prompt``, ``types``) imports no torch and no
Triton; model code lives in ``backends`` and ``checkpoints``.
"""

__version__ = "0.1.0"
