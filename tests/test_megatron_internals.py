"""megatron_red/megatron_internals.py: the installed megatron-core is checked once against the version whose internals
the package uses, and a changed internal fails with an error naming it."""
from __future__ import annotations

import importlib.metadata
import types

import pytest

pytest.importorskip("megatron.core")

from megatron_red import megatron_internals  # noqa: E402
from megatron_red.megatron_internals import MegatronCoreChanged  # noqa: E402


@pytest.fixture(autouse=True)
def fresh_check():
    megatron_internals.check.cache_clear()
    yield
    megatron_internals.check.cache_clear()


def test_the_installed_megatron_core_is_the_one_read():
    megatron_internals.check()
    assert importlib.metadata.version("megatron-core").startswith(megatron_internals.READ_IN + ".")


def test_another_version_is_refused_naming_both(monkeypatch):
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.20.1")
    with pytest.raises(MegatronCoreChanged, match=r"megatron-core 0\.20\.1 is installed.*internals of 0\.19"):
        megatron_internals.check()


def test_a_missing_internal_is_named(monkeypatch):
    import megatron.core.transformer.attention as attention

    monkeypatch.delattr(attention, "is_fa_min_version")
    with pytest.raises(MegatronCoreChanged, match="no longer has \\['is_fa_min_version'\\]"):
        megatron_internals.check()
    monkeypatch.undo()
    megatron_internals.check.cache_clear()
    # Instance attributes are looked for where they are used.
    with pytest.raises(MegatronCoreChanged, match="SimpleNamespace has no \\['_sampling'\\]"):
        megatron_internals.set_sampling(types.SimpleNamespace(), object())
    with pytest.raises(MegatronCoreChanged, match="_prefill_tokens_skipped"):
        megatron_internals.prefill_token_counts(types.SimpleNamespace(_prefill_tokens_computed=3))
    assert megatron_internals.prefill_token_counts(
        types.SimpleNamespace(_prefill_tokens_computed=3, _prefill_tokens_skipped=1)) == {"computed": 3, "skipped": 1}


def test_the_routing_internals_are_checked(monkeypatch):
    """Routing replay's hook (RouterReplay) and the context's per-token bookkeeping are looked for where used."""
    from megatron.core.transformer.moe.router_replay import RouterReplay

    assert megatron_internals.router_replay_class() is RouterReplay
    monkeypatch.delattr(RouterReplay, "clear_global_indices")
    with pytest.raises(MegatronCoreChanged, match="RouterReplay has no \\['clear_global_indices'\\]"):
        megatron_internals.router_replay_class()
    monkeypatch.undo()
    context = types.SimpleNamespace(**{name: None for name in megatron_internals.ROUTING_CONTEXT_NAMES[1:]})
    with pytest.raises(MegatronCoreChanged, match="has no \\['active_token_count'\\]"):
        megatron_internals.intercept_routing(context, print)
    stored, recorded = [], []
    allocator = type("Allocator", (), {"store_routing_per_block": lambda self, flat: stored.append(flat),
                                       "get_block_routing": lambda self, block: None})()
    context = types.SimpleNamespace(**{name: 0 for name in megatron_internals.ROUTING_CONTEXT_NAMES})
    context.kv_block_allocator = allocator
    megatron_internals.intercept_routing(context, recorded.append)
    megatron_internals.intercept_routing(context, recorded.append)  # once per context
    allocator.store_routing_per_block("step")
    assert recorded == ["step"] and stored == ["step"]  # recorded first, then megatron's own store
