"""Triton serving: model.py glue, BLS transport, the orchestrator, the server and its repository."""
