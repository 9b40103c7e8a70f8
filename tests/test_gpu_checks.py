"""tools/gpu_checks.sh, the one prepared GPU script, checked on CPU as far as it goes (no GPU here).

- bash accepts the script; its default steps are the open issues' checks in priority order, and the global budget
  skips (and records) every step that no longer fits, so the default list cannot outrun the device time;
- every Python command of every step, run as the script would run it but with CUDA hidden, parses its arguments
  and stops with a clear "needs a CUDA GPU" instead of a traceback: the tools, the anchor runner (which also must
  find HF generate where it patches it), bench_red_step without its torchrun launcher;
- the CUDA-test selection collects the CUDA tests, and megatron_train's and te_red's overrides are valid config keys.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "gpu_checks.sh"
DEFAULT = ["megatron_rollout", "mcore_anchor", "red_step", "red_step_k4", "te_red", "packed_rope", "offload",
           "megatron_smoke", "hf_anchor", "cuda_tests", "rollout_mismatch", "bench_kernels"]
BY_NAME = ["bench_kernels_nocompile", "profile_backward", "megatron_families", "megatron_train", "bench_rollout",
           "megatron_train_bf16", "step_overhead", "megatron_moe", "vllm_rollout"]


def cpu_env(**extra) -> dict:
    """This interpreter first on PATH (the script calls `python3`), the repository importable, CUDA hidden."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(ROOT), **extra)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def dry_run(*steps: str) -> list[tuple[str, int, str]]:
    """(step, limit, command line) as the script prints them with GPU_CHECKS_DRY_RUN=1."""
    out = subprocess.run(["bash", str(SCRIPT), *steps], cwd=ROOT, env=cpu_env(GPU_CHECKS_DRY_RUN="1"),
                         capture_output=True, text=True, check=True).stdout
    found = re.findall(r"^=== (\S+) \(limit (\d+)s\)\n\$ (.*)$", out, flags=re.M)
    assert len(found) == out.count("=== "), out
    return [(name, int(limit), command) for name, limit, command in found]


def test_script_syntax_default_order_and_budget(tmp_path):
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    assert [name for name, _, _ in dry_run()] == DEFAULT
    # With no budget left every step is skipped and recorded; nothing runs.
    out = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, capture_output=True, text=True,
                         env=cpu_env(GPU_CHECKS_BUDGET_S="0", OUT=str(tmp_path), SCRATCH=str(tmp_path / "scratch")))
    summary = (tmp_path / "summary.md").read_text()
    for name in DEFAULT:
        assert re.search(rf"^\| {name} \| skipped", summary, flags=re.M), (name, summary, out.stdout, out.stderr)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["gpu_checks.log", "summary.md"]


def _python_commands():
    for name, _, command in dry_run(*DEFAULT, *BY_NAME):
        argv = shlex.split(command)
        if "megatron_red.cli" in argv:
            continue  # megatron_train: checked below
        if "torch.distributed.run" in argv:  # the launcher's own error report would wrap the tool's message
            argv = ["python3", *argv[next(i for i, a in enumerate(argv) if a.startswith("tools/")):]]
        yield name, argv


@pytest.mark.parametrize("name,argv", list(_python_commands()), ids=lambda x: x if isinstance(x, str) else "")
def test_step_commands_stop_clearly_without_cuda(name, argv):
    if "pytest" in argv:
        out = subprocess.run([*argv, "--collect-only", "-q"], cwd=ROOT, env=cpu_env(), capture_output=True,
                             text=True, timeout=300)
        per_file = dict(re.findall(r"^(tests/\S+\.py): (\d+)$", out.stdout, flags=re.M))
        assert int(per_file.get("tests/test_paged_attention.py", 0)) >= 1, out.stdout[-2000:]
        assert sum(map(int, per_file.values())) >= 6, out.stdout[-2000:]
        return
    out = subprocess.run(argv, cwd=ROOT, env=cpu_env(), capture_output=True, text=True, timeout=300)
    text = out.stdout + out.stderr
    assert out.returncode != 0 and "needs a CUDA GPU" in text and "Traceback" not in text, (name, text[-3000:])


def test_anchor_runner_patches_generate_and_megatron_train_overrides():
    from transformers import GenerationMixin, Qwen2ForCausalLM

    assert Qwen2ForCausalLM.generate is GenerationMixin.generate  # the runner's patch reaches the anchor's model
    from megatron_red.config import load_config

    for name in ("megatron_train", "megatron_train_bf16"):
        (_, _, command), = dry_run(name)
        argv = shlex.split(command)
        overrides = argv[argv.index("train") + 1:]
        config = load_config(None, overrides)
        assert config.model.backend == "megatron" and config.trainer.steps == 3
    # te_red's runs (tools/resume_check.py): the tool's overrides and the step's are valid config keys together.
    (_, _, command), = dry_run("te_red")
    argv = shlex.split(command)
    sys.path.insert(0, str(ROOT / "tools"))
    from resume_check import run_overrides

    extra = [a for a in argv[argv.index("tools/resume_check.py") + 1:] if "=" in a]
    config = load_config(None, [*run_overrides(2, 4, extra), "trainer.steps=4"])
    assert (config.model.attention, config.model.backend, config.trainer.max_tokens_per_micro_batch) == (
        "te", "megatron", 1024)

    # megatron_moe's three runs: an 8-expert student on the Megatron backend, bf16 without / with replay, fp32.
    runs = dry_run("megatron_moe")
    assert [name for name, _, _ in runs] == ["megatron_moe_bfloat16_replay_false", "megatron_moe_bfloat16_replay_true",
                                             "megatron_moe_float32_replay_false"]
    for _, _, command in runs:
        argv = shlex.split(command)
        config = load_config(None, argv[argv.index("3") + 1:])
        assert config.model.backend == "megatron" and config.model.num_experts == 8
    # bench_red_step's overrides of red_step_k4 are config keys too.
    (_, _, command), = dry_run("red_step_k4")
    argv = shlex.split(command)
    config = load_config(None, argv[argv.index("2") + 1:])
    assert config.trainer.mini_batches_per_step == 4 and config.algo.loss == {"clip_eps_high": 0.28}
