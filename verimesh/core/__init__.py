"""Layer 1, primitives: digests, canonical encodings, RFC 9162 Merkle trees, the canonical
container, bounded file reads and tensors.

May import: ``verimesh.errors`` and numpy. Never onnx, onnxruntime or ezkl: everything above
builds on these, so they stay light and have no backend behind them.
"""
