"""`load_config`: embedded default <- YAML file <- dotted overrides, with type coercion and unknown-key errors."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from megatron_red.config import RewardsConfig, RunConfig, config_to_dict, load_config
from megatron_red.data.builtin import DEFAULT_REGIME
from megatron_red.errors import ConfigError
from megatron_red.models.optim import OptimConfig

EXAMPLES = sorted((Path(__file__).resolve().parent.parent / "examples" / "red").glob("*.yaml"))
ARCHITECTURES = EXAMPLES[0].parent / "architectures"
# The recipes name a local checkpoint directory (/models/...) and a data file that are not here: their
# architectures stand in for the checkpoints (validation reads config.json), and data files are not looked for.
RECIPE_MODELS = {"qwen25_math_1p5b_1gpu.yaml": "qwen2.5-math-1.5b", "qwen25_math_1p5b_8gpu.yaml": "qwen2.5-math-1.5b",
                 "qwen25_math_7b_8gpu.yaml": "qwen2.5-math-7b", "qwen25_32b_16gpu.yaml": "qwen2.5-32b",
                 "qwen3_30b_a3b_16gpu.yaml": "qwen3-30b-a3b"}
SOME_MODEL = str(ARCHITECTURES / "qwen2.5-math-1.5b")


def load_recipe(path: Path, overrides: list[str] = ()):
    model = [f"model.path={ARCHITECTURES / RECIPE_MODELS[path.name]}"] if path.name in RECIPE_MODELS else []
    return load_config(path, [*model, *overrides], planning=True)


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_no_file_no_overrides_is_the_embedded_default():
    config = load_config()
    # The embedded default, with the values load_config derives: the overlong buffer (a quarter of the limit), the
    # built-in task's regime ...
    assert config.rewards.overlong_buffer == config.rollout.max_new_tokens // 4 == 48
    data = dataclasses.replace(RunConfig().data, builtin={"regime": DEFAULT_REGIME})
    assert config == dataclasses.replace(RunConfig(), rewards=RewardsConfig(overlong_buffer=48), data=data)
    # ... and the schedule, which spans the whole run.
    assert config.optim.total_steps == config.trainer.steps == 150
    assert config.algo.method == "red" and config.data.task == "builtin" and config.model.path is None


def test_builtin_default_yaml_is_the_embedded_default():
    path = next(p for p in EXAMPLES if p.name == "builtin_default.yaml")
    assert config_to_dict(load_config(path)) == config_to_dict(load_config())


def test_builtin_regime_default_is_recorded():
    # The embedded default runs the latent-skill regime (docs/results.md, issue 25); load_config writes the regime
    # into the config, so config.yaml keeps it, also where a dict given whole names none.
    assert DEFAULT_REGIME == "latent_skill"
    assert load_config().data.builtin == {"regime": "latent_skill"}
    assert load_config(None, ["data.builtin={seed: 1}"]).data.builtin == {"seed": 1, "regime": "latent_skill"}
    assert load_config(None, ["data.builtin.regime=new_skill"]).data.builtin == {"regime": "new_skill"}


def test_overlong_buffer_default_override_and_range():
    assert load_config(None, ["rollout.max_new_tokens=100"]).rewards.overlong_buffer == 25
    assert load_config(None, ["rewards.overlong_buffer=0"]).rewards.overlong_buffer == 0  # off
    for recipe in (p for p in EXAMPLES if p.name.startswith("qwen")):
        assert load_recipe(recipe).rewards.overlong_buffer == 2000  # the authors' 6192 of 8192
    with pytest.raises(ConfigError, match="overlong_buffer"):
        load_config(None, ["rewards.overlong_buffer=200"])  # beyond the 192-token limit
    with pytest.raises(ConfigError, match="overlong_buffer"):
        load_config(None, ["rewards.overlong_buffer=-1"])


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_example_recipe_loads(path):
    config = load_recipe(path)
    assert isinstance(config, RunConfig)
    assert isinstance(config.optim, OptimConfig)


def test_qwen_recipe_values():
    config = load_recipe(next(p for p in EXAMPLES if p.name == "qwen25_math_1p5b_1gpu.yaml"))
    assert config.data.task == "openr1" and config.model.dtype == "bfloat16"
    assert config.model.gradient_checkpointing is True
    assert config.optim.lr == pytest.approx(2e-6) and config.optim.min_lr_ratio == pytest.approx(0.1)
    # Fields the file leaves out keep the embedded default.
    assert config.rollout.engine == RunConfig().rollout.engine
    assert config.optim.total_steps == config.trainer.steps == 500


@pytest.mark.parametrize("name", ["qwen25_math_1p5b_8gpu.yaml", "qwen25_math_7b_8gpu.yaml", "qwen25_32b_16gpu.yaml"])
def test_recipes_at_scale_take_four_optimiser_steps_with_clip_higher(name):
    """The authors' later GRPO code: 4 optimiser steps per rollout batch, clip (1 - 0.2, 1 + 0.28); the schedule
    counts optimiser steps, so its warm-up and length are 4x the RL steps'."""
    config = load_recipe(next(p for p in EXAMPLES if p.name == name))
    assert (config.trainer.prompts_per_step, config.trainer.mini_batches_per_step) == (64, 4)
    assert config.algo.loss == {"clip_eps_high": 0.28}
    assert config.optim.total_steps == 4 * config.trainer.steps and config.optim.warmup_steps == 40


def test_file_then_overrides(tmp_path):
    path = _write(tmp_path, "trainer:\n  steps: 10\n  seed: 3\nrollout:\n  n: 4\ndata:\n  builtin:\n    num_test: 5\n")
    config = load_config(path, ["trainer.steps=12", "data.builtin.num_train=10", "algo.method=grpo"])
    assert config.trainer.steps == 12          # override beats the file
    assert config.trainer.seed == 3            # file beats the default
    assert config.rollout.n == 4
    assert config.rollout.temperature == RunConfig().rollout.temperature
    # A dotted key reaches into a dict field and merges with the file's entries.
    assert config.data.builtin == {"num_test": 5, "num_train": 10, "regime": DEFAULT_REGIME}
    assert config.algo.method == "grpo"
    # total_steps follows trainer.steps unless it is set explicitly.
    assert config.optim.total_steps == 12
    assert load_config(path, ["optim.total_steps=40"]).optim.total_steps == 40


def test_dict_override_as_yaml_flow_mapping():
    config = load_config(None, ["data.builtin={num_train: 64, num_test: 16}", "algo.loss={normalization: constant}"])
    assert config.data.builtin == {"num_train": 64, "num_test": 16, "regime": DEFAULT_REGIME}
    assert config.algo.loss == {"normalization": "constant"}


def test_type_coercion():
    config = load_config(None, [
        "trainer.steps=7",                      # int
        "optim.lr=3e-4",                        # YAML reads 3e-4 as a string: coerced to float
        "rollout.temperature=1",                # int -> float
        "trainer.tensorboard=off",              # YAML bool
        "trainer.progress=0",                   # 0 -> False
        "model.gradient_checkpointing=yes",
        "algo.bread_prefix_fractions=0.1,0.9",  # comma list -> tuple
        "optim.betas=[0.8, 0.9]",               # YAML list -> tuple
        f"model.path={SOME_MODEL}",             # str | None
        "data.path=null",
    ])
    assert config.trainer.steps == 7 and type(config.trainer.steps) is int
    assert config.optim.lr == 3e-4 and type(config.optim.lr) is float
    assert config.rollout.temperature == 1.0 and type(config.rollout.temperature) is float
    assert config.trainer.tensorboard is False and config.trainer.progress is False
    assert config.model.gradient_checkpointing is True
    assert config.algo.bread_prefix_fractions == (0.1, 0.9)
    assert config.optim.betas == (0.8, 0.9)
    assert config.model.path == SOME_MODEL and config.data.path is None


@pytest.mark.parametrize("override, named", [
    ("trainer.stepz=3", "stepz"),
    ("trainr.steps=3", "trainr"),
    ("rollout.n.x=1", "n"),
])
def test_unknown_keys_raise_naming_the_key(override, named):
    with pytest.raises(ValueError, match=named):
        load_config(None, [override])


def test_unknown_key_in_file_raises(tmp_path):
    with pytest.raises(ValueError, match="temprature"):
        load_config(_write(tmp_path, "rollout:\n  temprature: 0.5\n"))


@pytest.mark.parametrize("override", ["trainer.steps=many", "trainer.tensorboard=maybe", "rollout.n=[1, 2]",
                                      "data.builtin=5", "trainer=3"])
def test_bad_values_raise(override):
    with pytest.raises(ValueError):
        load_config(None, [override])


def test_malformed_override_and_file(tmp_path):
    with pytest.raises(ValueError, match="section.key=value"):
        load_config(None, ["trainer.steps"])
    with pytest.raises(ValueError, match="mapping"):
        load_config(_write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ValueError, match="not a section"):
        load_config(None, ["trainer.steps=3", "trainer.steps.x=1"])


@pytest.mark.parametrize("override", ["trainer.steps=2.5", "trainer.steps=true"])
def test_int_fields_reject_lossy_values(override):
    # int(2.5) == 2 and int(True) == 1: a typo would silently train a different run.
    with pytest.raises(ValueError, match="steps"):
        load_config(None, [override])


@pytest.mark.parametrize("override, named", [("data.builtin.num_trian=5", "num_trian"),
                                             ("algo.loss.clip_epz=0.1", "clip_epz")])
def test_unknown_keys_of_dict_fields_raise_at_load(override, named):
    # data.builtin and algo.loss are passed on as **kwargs (BuiltinTaskConfig, RedLossConfig); a misspelt key
    # must fail here with a ValueError (which the CLI reports) rather than as a TypeError deep in the trainer.
    with pytest.raises(ValueError, match=named):
        load_config(None, [override])


def test_saved_config_yaml_round_trips(tmp_path):
    # The trainer writes config_to_dict(config) as RUN_DIR/config.yaml; --resume reloads it.
    import yaml

    config = load_config(None, ["trainer.steps=9", "algo.bread_prefix_fractions=[0.5]", "data.builtin={seed: 2}",
                                "optim.betas=[0.8, 0.9]", f"model.path={SOME_MODEL}"])
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
    assert load_config(path) == config


@pytest.mark.parametrize("value", ["on", "off"])
def test_on_off_string_fields_keep_their_word(tmp_path, value):
    # model.fused_kernel takes "auto" / "on" / "off", but YAML 1.1 reads on/off as booleans: the documented values
    # must reach the policy as the words, not as "True"/"False" (which HFPolicy rejects).
    assert load_config(None, [f"model.fused_kernel={value}"]).model.fused_kernel == value
    assert load_config(_write(tmp_path, f"model:\n  fused_kernel: {value}\n")).model.fused_kernel == value


# ---------------------------------------------------------------------------------------------- validation at load
@pytest.mark.parametrize("override, message", [
    ("rollout.n=0", "rollout.n=0: must be >= 1"),
    ("rollout.temperature=-1", "rollout.temperature=-1.0: must be > 0"),
    ("rollout.top_p=1.5", "rollout.top_p=1.5: must be in (0, 1]"),
    ("rollout.engine=sglang", "rollout.engine='sglang': must be one of auto, local, megatron, vllm"),
    ("rollout.kv_buffer_gb=0", "rollout.kv_buffer_gb=0.0: must be null or > 0"),
    ("trainer.save_every=0", "trainer.save_every=0: must be >= 1"),
    ("trainer.keep_last=-1", "trainer.keep_last=-1: must be >= 0"),
    ("trainer.dist_timeout_minutes=0", "trainer.dist_timeout_minutes=0.0: must be > 0"),
    ("data.eval_fraction=1", "data.eval_fraction=1.0: must be in [0, 1)"),
    ("algo.method=nope", "algo.method='nope': must be one of red, "),
    ("algo.bread_prefix_fractions=[0.5, 1.5]", "algo.bread_prefix_fractions=(0.5, 1.5): must be a list of values in"),
    ("model.dtype=fp8", "model.dtype='fp8': must be one of auto, float32, bfloat16, float16"),
    ("model.attention=flash", "model.attention='flash': must be one of auto, te, sdpa, local"),
    ("model.device=gpu", "model.device='gpu': must be auto or a torch device"),
    ("optim.lr=0", "optim: lr must be > 0"),
    ("algo.loss={clip_eps: -1}", "algo.loss: "),
    ("data.builtin={regime: nope}", "data.builtin: unknown data.builtin.regime 'nope'"),
    ("rewards.overlong_buffer=500", "rewards.overlong_buffer=500 must be at most rollout.max_new_tokens=192"),
    ("model.expert_model_parallel_size=0", "model.expert_model_parallel_size=0: must be >= 1"),
    ("model.moe_router_dtype=bf16", "model.moe_router_dtype='bf16': must be one of fp32, fp64, model"),
    ("model.moe_aux_loss_coeff=-0.1", "model.moe_aux_loss_coeff=-0.1: must be >= 0"),
    ("model.moe_capacity_factor=0", "model.moe_capacity_factor=0.0: must be null or > 0"),
    ("model.num_experts=-1", "model.num_experts=-1: must be >= 0"),
])
def test_out_of_range_values_name_the_key_and_range(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert message in str(err.value)


@pytest.mark.parametrize("overrides, message", [
    (["model.sequence_parallel=true"], "model.sequence_parallel: only the Megatron backend reads it"),
    (["trainer.max_tokens_per_micro_batch=4096", "model.tensor_model_parallel_size=2"],
     "model.tensor_model_parallel_size, trainer.max_tokens_per_micro_batch: only the Megatron backend reads them"),
    (["rollout.engine=megatron"], "rollout.engine=megatron needs model.backend=megatron"),
    (["model.backend=megatron", "rollout.engine=local"], "rollout.engine=megatron (its own shards; or auto) or vllm"),
    (["model.backend=megatron", "model.gradient_checkpointing=true", "model.recompute_modules=[mlp]"],
     "(model.gradient_checkpointing) or selective recompute (model.recompute_modules), not both"),
    (["model.backend=megatron", "model.recompute_modules=[mlp, attn]"], "model.recompute_modules=('mlp', 'attn')"),
    (["model.backend=megatron", "model.sequence_parallel=true"], "model.sequence_parallel needs"),
    (["model.backend=megatron", "model.tensor_model_parallel_size=3"],
     "model.tensor_model_parallel_size=3 must divide the 4 attention heads"),
    (["model.backend=megatron", "model.pipeline_model_parallel_size=3"],
     "model.pipeline_model_parallel_size=3 must divide the 4 layers"),
    (["model.backend=megatron", "model.attention=local", "trainer.max_tokens_per_micro_batch=64"],
     "cannot run packed micro-batches"),
    (["model.backend=megatron", "model.tensor_model_parallel_size=2", "model.sequence_parallel=true",
      "trainer.max_tokens_per_micro_batch=65"], "must be a multiple of TP=2"),
    (["model.backend=megatron", "model.device=cpu"], "model.device='cpu': the Megatron backend puts each rank"),
    (["data.task=openr1"], "data.task=openr1 needs data.path"),
    (["model.num_kv_heads=3"], "model.num_kv_heads=3 must divide model.num_heads=4"),
    # mixtures of experts (the built-in student with model.num_experts, or a model.path of one)
    (["model.moe_aux_loss_coeff=0.01"], "model.moe_aux_loss_coeff: only the Megatron backend reads it"),
    (["model.backend=megatron", "model.expert_model_parallel_size=2"],
     "model.expert_model_parallel_size=2: the model has no experts"),
    (["model.backend=megatron", "model.moe_router_dtype=fp64"],
     "model.moe_router_dtype: only a mixture of experts reads it (the model has no experts)"),
    (["model.backend=megatron", "model.num_experts=6", "model.expert_model_parallel_size=4"],
     "model.expert_model_parallel_size=4 must divide the 6 experts"),
    (["model.backend=megatron", "model.num_experts=8", "model.tensor_model_parallel_size=2"],
     "megatron-core trains mixture-of-experts layers tensor-parallel only with sequence parallelism"),
    (["model.num_experts=4", "model.num_experts_per_tok=5"], "model.num_experts_per_tok=5 must be at most"),
    (["model.num_experts=4", "rollout.cuda_graph=true"], "the local engine decodes a mixture of experts eagerly"),
    (["model.backend=megatron", "model.num_experts=4", "model.expert_model_parallel_size=2", "algo.method=bread"],
     "algo.method=bread with model.expert_model_parallel_size > 1"),
    (["model.backend=megatron", f"model.path={ARCHITECTURES / 'qwen3-30b-a3b'}", "model.expert_model_parallel_size=3"],
     "model.expert_model_parallel_size=3 must divide the 128 experts"),
])
def test_contradicting_settings_are_refused_at_load(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert message in str(err.value)


def test_paths_are_checked_at_load(tmp_path):
    with pytest.raises(ConfigError, match="model.path=/models/nowhere: no Hugging Face checkpoint directory there"):
        load_config(None, ["model.path=/models/nowhere"])
    openr1 = ["data.task=openr1", f"model.path={SOME_MODEL}"]
    with pytest.raises(ConfigError, match=f"data.path={tmp_path / 'rows.parquet'}: no such file"):
        load_config(None, [*openr1, f"data.path={tmp_path / 'rows.parquet'}"])
    config = load_config(None, [*openr1, f"data.path={tmp_path / 'rows.parquet'}"], planning=True)  # plan's
    assert config.data.path == str(tmp_path / "rows.parquet")
    # The architecture a Megatron layout must divide comes from model.path's config.json (Qwen2.5-Math-7B: 28
    # heads, 4 key/value groups, 28 layers).
    seven_b = ["model.backend=megatron", f"model.path={ARCHITECTURES / 'qwen2.5-math-7b'}"]
    assert load_config(None, [*seven_b, "model.tensor_model_parallel_size=4", "model.pipeline_model_parallel_size=7"])
    with pytest.raises(ConfigError, match="must divide the 28 attention heads and the 4 key/value groups"):
        load_config(None, [*seven_b, "model.tensor_model_parallel_size=7"])


def test_config_errors_are_value_errors_of_their_own_type():
    assert issubclass(ConfigError, ValueError)
    for override in ("trainer.stepz=3", "trainer.steps=many", "trainer.steps", "rollout.n=0"):
        with pytest.raises(ConfigError):
            load_config(None, [override])
    with pytest.raises(ConfigError, match="missing.yaml"):
        load_config("missing.yaml")
