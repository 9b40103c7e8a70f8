"""Rollout engines behind one interface (`RolloutEngine`): the local torch engine, vLLM, Megatron inference."""
from megatron_red.rollout.base import Completion, RolloutEngine, SamplingParams
from megatron_red.rollout.local import LocalEngine

__all__ = ["Completion", "LocalEngine", "RolloutEngine", "SamplingParams"]
