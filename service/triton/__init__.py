"""Serving through a real Triton Inference Server: the launcher and the library the models call.

See docs/triton.md and model_repo/.
"""
