"""Backends behind the pipeline Protocols: torch_ref, ort, trt, hf_mllm, ortgenai_mllm, trtllm_mllm.

None imports another; ``conceptseg.build`` chooses among them.
"""
