"""megatron_red: RED (Recall-Extend Dynamics) training on megatron-core."""
__version__ = "0.1.0"
