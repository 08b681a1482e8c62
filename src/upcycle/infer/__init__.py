"""Inference-time conversion and decoding: a model's layers at another precision (precision.py), dense
layers through the kernel's row dots and layers that read one input stacked (rows.py), and the lean
greedy decoder (decode.py). Nothing here trains or measures; eval/ keeps the metrics."""
