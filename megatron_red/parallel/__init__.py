"""Megatron-core's pipeline schedule for RED's forwards and updates (pipeline.py) and the micro-batches it runs:
right-padded rows or THD-packed sequences (packing.py)."""
