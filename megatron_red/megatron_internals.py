"""The megatron-core internals megatron_red relies on beyond megatron-core's public API, all behind this module:

- the dynamic inference engine's sampling seam, `TextGenerationController._sampling`, which our row sampler takes
  (rollout/megatron.py), and the engine's prefill counters `DynamicInferenceEngine._prefill_tokens_computed` /
  `_prefill_tokens_skipped` (what its own step log prints);
- the names megatron's attention module (`megatron.core.transformer.attention`) imports from flash-attn and checks
  it with, which rollout/megatron_attention.py replaces when no usable flash-attn is installed;
- megatron-core's router-replay hook (`transformer/moe/router_replay.py`: `RouterReplay`, which every `TopKRouter`
  calls through its `router_replay` attribute and the dynamic engine records through; parallel/routing.py puts
  its own hook there, holding one), and the dynamic context's step of storing that record: megatron keeps it per
  KV block and rebuilds a request's when the request finishes, but by then a block the request just freed may
  already hold another request's tokens (the last block's record is lost), so rollout/megatron.py reads each
  step's record by request and position itself (`intercept_routing`; the context's per-token request slot and
  position, its requests' ids and block tables, and the per-block records of prefix-shared blocks);
- that megatron-core's model forward, pipeline schedules and DDP call CUDA unconditionally, so the Megatron backend
  trains only where CUDA is available (`megatron_runs_here`). The package never patches torch; the tests' CPU
  stand-ins for those calls (tests/megatron_compat.py, never imported by the package) set `CPU_STAND_INS` in the
  process they patch, which is the only way the check passes without CUDA.

They were read in megatron-core 0.19 (setup.py pins >=0.19,<0.20). On first use, `check()` compares the installed
version with that and looks for every module-level name; a use looks for the instance attribute it touches. What
changed fails as `MegatronCoreChanged`, naming it, instead of a wrong result or an AttributeError inside megatron.
"""
from __future__ import annotations

import functools
import importlib
import importlib.metadata

import torch

READ_IN = "0.19"
"""The megatron-core minor version whose internals this module touches."""
ATTENTION_MODULE = "megatron.core.transformer.attention"
ATTENTION_NAMES = ("flash_attn_varlen_func", "flash_attn_with_kvcache", "is_fa_min_version", "rearrange", "HAVE_FA3",
                   "HAVE_FA4")
"""What megatron's attention module takes from flash-attn (and einops) at import, and its flash-attn version check."""


CPU_STAND_INS = False
"""True in a process whose megatron-core CUDA calls the tests' compatibility layer has redirected to the CPU
(tests/megatron_compat.py sets it); nothing in the package sets it."""


def megatron_runs_here() -> bool:
    """Whether megatron-core can train in this process: a CUDA device is visible (or the tests' CPU stand-ins are
    installed)."""
    return torch.cuda.is_available() or CPU_STAND_INS


class MegatronCoreChanged(RuntimeError):
    """The installed megatron-core is not the one whose internals megatron_red uses; the message names the change."""


@functools.cache
def check() -> None:
    """The installed megatron-core is 0.19 and its attention module has every name we replace (once per process)."""
    installed = importlib.metadata.version("megatron-core")
    if ".".join(installed.split(".")[:2]) != READ_IN:
        raise MegatronCoreChanged(f"megatron-core {installed} is installed, but megatron_red reaches into the "
                                  f"internals of {READ_IN} (megatron_red/megatron_internals.py): install "
                                  "megatron-core>=0.19,<0.20, or port that module")
    missing = [name for name in ATTENTION_NAMES if not hasattr(_attention(), name)]
    if missing:
        raise MegatronCoreChanged(f"{ATTENTION_MODULE} no longer has {missing}, which megatron_red's paged attention "
                                  "replaces when flash-attn is absent (rollout/megatron_attention.py)")


def _attention():
    return importlib.import_module(ATTENTION_MODULE)


def _require(obj, *names: str, what: str) -> None:
    check()
    missing = [name for name in names if not hasattr(obj, name)]
    if missing:
        raise MegatronCoreChanged(f"megatron-core's {type(obj).__name__} has no {missing} ({what})")


ROUTER_REPLAY_NAMES = ("get_replay_topk", "set_global_router_replay_action", "clear_global_router_replay_action",
                       "clear_global_indices", "clear_global_router_replay_instances", "router_replay_action")
"""What parallel/routing.py uses of megatron's `RouterReplay` (methods, and an instance attribute set in __init__)."""


def router_replay_class():
    """megatron-core's `RouterReplay`, checked for what parallel/routing.py uses of it."""
    from megatron.core.transformer.moe.router_replay import RouterReplay

    check()
    missing = [name for name in ROUTER_REPLAY_NAMES[:-1] if not hasattr(RouterReplay, name)]
    if missing or ROUTER_REPLAY_NAMES[-1] not in RouterReplay.__init__.__code__.co_names:
        raise MegatronCoreChanged(f"megatron-core's RouterReplay has no {missing or ROUTER_REPLAY_NAMES[-1:]} "
                                  "(routing replay, megatron_red/parallel/routing.py)")
    return RouterReplay


ROUTING_CONTEXT_NAMES = ("active_token_count", "token_to_request_idx", "token_to_pos_ids", "request_ids",
                         "request_to_kv_block_ids", "block_size_tokens", "kv_block_allocator")


def intercept_routing(context, record) -> None:
    """Call `record(flat)` with each step's recorded routing ([active tokens, layers, k], megatron's token order)
    just before megatron's dynamic `context` stores it by block (once per context: a context keeps its allocator)."""
    _require(context, *ROUTING_CONTEXT_NAMES, what="the per-token bookkeeping routing replay reads")
    allocator = context.kv_block_allocator
    _require(allocator, "store_routing_per_block", "get_block_routing", what="its per-block routing records")
    if getattr(allocator, "_megatron_red_record", None) == record:
        return
    store = type(allocator).store_routing_per_block

    def store_and_record(flat):
        if flat is not None:
            record(flat)
        store(allocator, flat)

    allocator.store_routing_per_block = store_and_record
    allocator._megatron_red_record = record


def set_sampling(controller, sampling) -> None:
    """Make megatron's `TextGenerationController` sample with `sampling` (a megatron `Sampling`)."""
    _require(controller, "_sampling", what="the sampling backend megatron_red's row sampler replaces")
    controller._sampling = sampling


def prefill_token_counts(engine) -> dict[str, int]:
    """Prompt tokens a `DynamicInferenceEngine` prefilled ("computed") and took from shared KV blocks ("skipped")
    since it was built."""
    _require(engine, "_prefill_tokens_computed", "_prefill_tokens_skipped", what="its prefill counters")
    return {"computed": int(engine._prefill_tokens_computed), "skipped": int(engine._prefill_tokens_skipped)}


def flash_attn_usable(min_version: str) -> bool:
    """Whether megatron's dynamic attention found a flash-attn it can run: FA3 / FA4, or both FA2 functions at
    `min_version` or later."""
    check()
    attention = _attention()
    if attention.HAVE_FA3 or attention.HAVE_FA4:
        return True
    if attention.flash_attn_varlen_func is None or attention.flash_attn_with_kvcache is None:
        return False
    try:
        return bool(attention.is_fa_min_version(min_version))
    except Exception:  # noqa: BLE001 - any failure to read the version means "not usable"
        return False


def replace_flash_attn(varlen_func, with_kvcache, meets_version, rearrange) -> None:
    """Put these in place of megatron's flash-attn functions, its version check and (when einops is absent) its
    `rearrange`, in its attention module's namespace."""
    check()
    attention = _attention()
    attention.flash_attn_varlen_func = varlen_func
    attention.flash_attn_with_kvcache = with_kvcache
    attention.is_fa_min_version = meets_version
    if attention.rearrange is None:
        attention.rearrange = rearrange
