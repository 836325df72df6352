"""Model building blocks shared by the backends: Qwen decoding rules, SAM 3 inputs, the CTM.

Layer: above the pure core, below ``conceptseg.backends``. ``qwen`` and ``sam3_inputs`` and
``engines`` are numpy / PIL / tokenizers only (they run inside the Triton orchestrator, which
imports neither torch nor transformers); ``qwen_torch`` and ``ctm`` are their torch twins.
"""
