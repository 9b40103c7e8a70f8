"""megatron-core policy backend: GPTModel from an HF config, HF <-> Megatron weights, `MegatronPolicy` (the
actor of the RED trainer's Megatron runs), and loading Hugging Face checkpoints."""
from megatron_red.models.megatron.model import HFArchitecture, build_gpt_model, make_transformer_config, padded_vocab_size
from megatron_red.models.megatron.build import fused_kernel_enabled, load_hf_checkpoint
from megatron_red.models.megatron.policy import MegatronConfig, MegatronPolicy, ShardedModel, build_sharded_model
from megatron_red.models.megatron.weights import export_hf_state_dict, import_hf_state_dict

__all__ = ["HFArchitecture", "MegatronConfig", "MegatronPolicy", "ShardedModel", "build_gpt_model", "build_sharded_model",
           "export_hf_state_dict", "fused_kernel_enabled", "import_hf_state_dict", "load_hf_checkpoint",
           "make_transformer_config", "padded_vocab_size"]
