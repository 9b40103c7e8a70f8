"""megatron-core policy backend: GPTModel from an HF config in a `ParallelLayout`, HF <-> Megatron weights,
`MegatronPolicy` (the actor of the RED trainer's Megatron runs), and loading / exporting Hugging Face checkpoints."""
from megatron_red.models.megatron.build import load_hf_config
from megatron_red.models.megatron.layout import ParallelLayout
from megatron_red.models.megatron.model import (HFArchitecture, build_gpt_model, make_transformer_config,
                                                padded_vocab_size)
from megatron_red.models.megatron.policy import (MegatronConfig, MegatronPolicy, ShardedModel, build_sharded_model,
                                                 save_hf_pretrained)
from megatron_red.models.megatron.weights import HFExport, load_hf_weights

__all__ = ["HFArchitecture", "HFExport", "MegatronConfig", "MegatronPolicy", "ParallelLayout", "ShardedModel",
           "build_gpt_model", "build_sharded_model", "load_hf_config", "load_hf_weights", "make_transformer_config",
           "padded_vocab_size", "save_hf_pretrained"]
