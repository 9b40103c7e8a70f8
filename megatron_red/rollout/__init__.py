"""Rollout engines behind one interface (`RolloutEngine`): the local torch engine (Hugging Face backend),
megatron-core's dynamic engine on the Megatron policy's own shards (`rollout.megatron`, imported on use: it needs
megatron-core) and vLLM colocated with either backend (`rollout.vllm_engine`; vLLM is imported when an engine is
built); `megatron_red.trainer.build.build_engine` constructs each."""
from megatron_red.rollout.base import Completion, RolloutEngine, SamplingParams
from megatron_red.rollout.local import LocalEngine

__all__ = ["Completion", "LocalEngine", "RolloutEngine", "SamplingParams"]
