"""`megatron-red plan` and `train` agree on the parallel layout of every shipped recipe.

For each recipe with the Megatron backend, the layout line `plan` prints equals the layout read back from what
`train`'s builder (`trainer.build.megatron_policy`) makes: megatron-core's parallel state (TP, PP, DP), the model's
parameters and TransformerConfig (dtype, sequence parallelism, recompute, RoPE fusion), its core-attention modules,
the optimizer class and whether a forward goes through the fused LM-head kernel. Both resolve
`trainer.build.parallel_layout` for
plan's target, a CUDA device (`auto` dtype bfloat16, `auto` fused kernel on): the device `train` passes on a GPU
machine. The builder runs on the CPU (tests/megatron_compat.py), so the recipes' worlds (8 or 16 GPUs, up to
TP 8 x PP 2) cannot be built here: every recipe runs with its own layout fields at TP, PP <= 2 in one world of 4
gloo processes (DP = 4 / (TP x PP)), with a tiny Qwen2 checkpoint as `model.path` (a tiny Qwen3-MoE for the
mixture-of-experts recipe, at EP 2: PP 1 there, so that EP divides DP); `plan` prints that same config at world
size 4. The Hugging Face recipes are refused by `plan`, naming `model.backend`.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml

from dist_utils import run_distributed

pytest.importorskip("megatron.core")
transformers = pytest.importorskip("transformers")

RECIPES = sorted(Path(__file__).resolve().parent.parent.glob("examples/red/*.yaml"))
WORLD = 4


def _model_section(recipe: Path) -> dict:
    return yaml.safe_load(recipe.read_text())["model"]


def _megatron(recipe: Path) -> bool:
    return _model_section(recipe)["backend"] == "megatron"


def _reduced(recipe: Path, tiny: Path, tiny_moe: Path, data: Path) -> list[str]:
    """Overrides that keep the recipe's layout fields at TP, PP, EP <= 2 with the tiny model (PP 1 with EP 2)."""
    model = _model_section(recipe)
    tp, pp, ep = (min(2, model.get(f"{k}_model_parallel_size", 1)) for k in ("tensor", "pipeline", "expert"))
    pp = 1 if ep > 1 else pp
    return [f"model.path={tiny_moe if 'expert_model_parallel_size' in model else tiny}", f"data.path={data}",
            f"model.tensor_model_parallel_size={tp}", f"model.pipeline_model_parallel_size={pp}",
            f"model.expert_model_parallel_size={ep}"]


def _built_layout(rank, world_size, runs):
    """In each rank of the world: build every recipe's policy as `train` does and read its layout back (with
    whether this rank holds the last pipeline stage, where the LM head runs)."""
    import megatron_compat
    megatron_compat.install()
    from megatron.core import parallel_state as ps
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from megatron_red.batch import SequenceBatch
    from megatron_red.config import load_config, student_experts
    from megatron_red.models.megatron.layout import ParallelLayout
    from megatron_red.models.megatron.local_spec import SDPACoreAttention
    from megatron_red.models.megatron.weights import unwrap_model
    from megatron_red.parallel import pipeline
    from megatron_red.trainer.build import megatron_policy, parallel_layout

    fused_calls = []  # the kernel as the pipeline's LM head (LogprobHead) calls it
    fused = pipeline.fused_linear_logprobs_entropy
    pipeline.fused_linear_logprobs_entropy = lambda *a, **k: fused_calls.append(1) or fused(*a, **k)
    built = {}
    for name, path, overrides in runs:
        config = load_config(path, overrides)
        policy = megatron_policy(config, parallel_layout(config.model, world_size, torch.device("cuda"),
                                                         student_experts(config.model)), config.model.path)
        model = unwrap_model(policy.model)
        tc = model.config
        attention = {SDPACoreAttention: "sdpa", DotProductAttention: "local"}.get(
            type(model.decoder.layers[0].self_attention.core_attention), "te")
        ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
        fused_calls.clear()
        policy.get_inference_log_probs(SequenceBatch(ids, torch.ones_like(ids), torch.ones(1, 7)), 1)
        built[name] = ps.is_pipeline_last_stage(), ParallelLayout(
            tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
            pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size(),
            data_parallel_size=ps.get_data_parallel_world_size(),
            dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
            use_distributed_optimizer=all(isinstance(o, DistributedOptimizer)
                                          for o in policy.optimizer.chained_optimizers),
            sequence_parallel=tc.sequence_parallel, attention=attention, rope_fusion=tc.apply_rope_fusion,
            recompute=tc.recompute_granularity or "none",
            recompute_modules=tuple(tc.recompute_modules) if tc.recompute_granularity == "selective" else (),
            fused_kernel=bool(fused_calls), moe=tc.num_moe_experts is not None,
            expert_model_parallel_size=ps.get_expert_model_parallel_world_size(),
            moe_router_dtype=tc.moe_router_dtype or "model",
            moe_aux_loss_coeff=tc.moe_aux_loss_coeff, moe_capacity_factor=tc.moe_expert_capacity_factor).describe()
        ps.destroy_model_parallel()
    return built


def test_plan_prints_the_layout_train_builds(tmp_path, capsys):
    from megatron_red.cli import main

    tiny = tmp_path / "tiny"
    transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=256, max_position_embeddings=64, tie_word_embeddings=False)).save_pretrained(tiny)
    tiny_moe = tmp_path / "tiny_moe"
    transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
        hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=256,
        max_position_embeddings=64, tie_word_embeddings=False)).save_pretrained(tiny_moe)
    data = tmp_path / "rows.parquet"
    data.touch()
    runs = [(r.stem, str(r), _reduced(r, tiny, tiny_moe, data)) for r in RECIPES if _megatron(r)]
    assert {name for name, _, _ in runs} == {"qwen25_math_1p5b_8gpu", "qwen25_math_7b_8gpu", "qwen25_32b_16gpu",
                                             "qwen3_30b_a3b_16gpu"}

    planned = {}
    for name, path, overrides in runs:
        assert main(["plan", "--world-size", str(WORLD), path, *overrides]) == 0
        planned[name] = re.search(r"^layout: (.*)$", capsys.readouterr().out, re.M).group(1)
    ranks = run_distributed(_built_layout, WORLD, runs, timeout_s=600)
    for name, _, _ in runs:
        built = {layout for layouts in ranks for last_stage, layout in [layouts[name]] if last_stage}
        assert built == {planned[name]}, name
    assert "sequence parallel True" in planned["qwen25_32b_16gpu"] and "TP 2 x PP 2 x DP 1" in planned[
        "qwen25_32b_16gpu"]
    assert planned["qwen3_30b_a3b_16gpu"].startswith("TP 2 x PP 1 x DP 2") and planned["qwen3_30b_a3b_16gpu"].endswith(
        "; experts: EP 2, fp32 router, aux loss 0, dropless")
    assert "experts" not in planned["qwen25_32b_16gpu"]
    # `attention: auto` in every recipe runs only what has run on a GPU: sdpa, unfused RoPE (issue 33).
    assert all("attention sdpa, RoPE fusion False" in line for line in planned.values()), planned


def test_auto_attention_is_sdpa_with_or_without_transformer_engine(monkeypatch):
    """`auto` does not follow the installation: with Transformer Engine importable (a stand-in module here; the NGC
    image has the real one) it is still sdpa, and `te` stays available, with RoPE fusion."""
    import sys
    import types

    from megatron_red.config import load_config
    from megatron_red.models.megatron import layout
    from megatron_red.trainer.build import parallel_layout

    monkeypatch.setitem(sys.modules, "transformer_engine", types.ModuleType("transformer_engine"))
    assert layout.transformer_engine_available()
    for attention, rope_fusion in (("auto", False), ("sdpa", False), ("te", True)):
        model = load_config(None, ["model.backend=megatron", f"model.attention={attention}"]).model
        built = parallel_layout(model, 1, torch.device("cuda"))
        assert (built.attention, built.rope_fusion) == ("te" if attention == "te" else "sdpa", rope_fusion)


@pytest.mark.parametrize("recipe", [r for r in RECIPES if not _megatron(r)], ids=lambda r: r.stem)
def test_plan_refuses_the_hugging_face_recipes(recipe, capsys):
    from megatron_red.cli import main

    assert main(["plan", str(recipe), "model.path=null", "data.task=builtin"]) == 2
    assert "model.backend" in capsys.readouterr().err
