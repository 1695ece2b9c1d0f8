"""Serving an exported model with ONNX Runtime: next-token sampling and a KV-cached generation engine.

Nothing on this path imports torch, so a server needs only onnxruntime, numpy, tokenizers and jinja2.
"""
