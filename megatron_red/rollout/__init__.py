"""Rollout engines behind one interface (`RolloutEngine`); this release ships the local torch engine."""
from megatron_red.rollout.base import Completion, RolloutEngine, SamplingParams
from megatron_red.rollout.local import LocalEngine

__all__ = ["Completion", "LocalEngine", "RolloutEngine", "SamplingParams"]
