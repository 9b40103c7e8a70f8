"""Policy backends behind one interface (`PolicyBackend`): Hugging Face (`HFPolicy`) and megatron-core."""
from megatron_red.models.base import LossFn, PolicyBackend
from megatron_red.models.hf import HFPolicy
from megatron_red.models.optim import OptimConfig, build_optimizer, clip_grad_norm, lr_multiplier

__all__ = ["HFPolicy", "LossFn", "OptimConfig", "PolicyBackend", "build_optimizer", "clip_grad_norm", "lr_multiplier"]
