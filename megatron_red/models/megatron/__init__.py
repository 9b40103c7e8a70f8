"""megatron-core policy backend: GPTModel from an HF config, HF <-> Megatron weights, `MegatronPolicy`."""
from megatron_red.models.megatron.model import HFArchitecture, build_gpt_model, make_transformer_config, padded_vocab_size
from megatron_red.models.megatron.policy import MegatronConfig, MegatronPolicy
from megatron_red.models.megatron.weights import export_hf_state_dict, import_hf_state_dict

__all__ = ["HFArchitecture", "MegatronConfig", "MegatronPolicy", "build_gpt_model", "export_hf_state_dict",
           "import_hf_state_dict", "make_transformer_config", "padded_vocab_size"]
