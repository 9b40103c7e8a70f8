"""`megatron-red`: help texts, `compare` (Table-2-style report and dynamics plots), `plot`, and usage errors."""
from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from megatron_red.cli import main
from trainer_fixtures import REPO_ROOT, TINY_OVERRIDES, read_lines, subprocess_env

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _entry_point() -> list[str]:
    """The installed console script, or the module when the package is not installed."""
    script = shutil.which("megatron-red", path=str(Path(sys.executable).parent))
    return [script] if script else [sys.executable, "-m", "megatron_red.cli"]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*_entry_point(), *args], cwd=REPO_ROOT, env=subprocess_env(), capture_output=True,
                          text=True, timeout=120)


def test_help():
    result = _run("--help")
    assert result.returncode == 0, result.stderr
    for command in ("train", "compare", "plot"):
        assert command in result.stdout
    result = _run("train", "--help")
    assert result.returncode == 0, result.stderr
    assert "--resume" in result.stdout and "--config" in result.stdout and "section.key=value" in result.stdout
    assert _run().returncode == 2  # a command is required


def _assert_png(path: Path) -> None:
    import matplotlib.image

    assert path.read_bytes()[:8] == PNG_MAGIC
    height, width = matplotlib.image.imread(path).shape[:2]
    assert height > 100 and width > 100


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "compare"
    code = main(["compare", "--methods", "red,grpo", "--seeds", "0", "--out", str(out), *TINY_OVERRIDES,
                 "trainer.steps=2", "trainer.save_every=1"])
    assert code == 0
    return out


def _table_rows(text: str) -> dict[str, list[str]]:
    return {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in text.splitlines()
            if line.startswith("| ") and not line.startswith(("| method", "| premise"))}


def _comparable(run_dir: Path) -> list[dict]:
    """A run's metric records without wall times."""
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in read_lines(run_dir)]


def test_compare_writes_table_and_plot(compared):
    text = (compared / "table.md").read_text()
    assert text.index("## Premises") < text.index("## Held-out accuracy at the end")
    rows = _table_rows(text)
    initial = read_lines(compared / "red_seed0")[0]
    assert initial["step"] == 0 and "eval/accuracy" in initial
    for method in ("red", "grpo"):
        run_dir = compared / f"{method}_seed0"
        lines = read_lines(run_dir)
        # Step 0: the warmed-up student, the same for every method of a seed (one cached student).
        assert [r["step"] for r in lines] == [0, 1, 2, 2] and lines[-1]["final"]
        assert lines[0] == initial
        final, cells = lines[-1], rows[method]
        assert cells[0] == "1"  # one seed
        assert cells[1] == f"{100 * final['eval/accuracy']:.1f}"
        assert cells[4] == f"{final['eval/mean_length']:.1f}"
        assert yaml.safe_load((run_dir / "config.yaml").read_text())["algo"]["method"] == method
    assert len(list((compared / ".cache").glob("student_*"))) == 1
    assert rows["student before training (step 0)"][1] == f"{100 * initial['eval/accuracy']:.1f}"
    # Premises: (a) measured on the step-0 student, (b) on GRPO's final evaluation, (c) not run (no sft).
    premise_a = rows["(a) student before training fails hard problems"]
    assert premise_a[0].startswith(f"hard {100 * initial['eval/accuracy_hard']:.1f}%")
    grpo_hard = read_lines(compared / "grpo_seed0")[-1]["eval/accuracy_hard"]
    assert rows["(b) GRPO alone stays near (a)"][0].startswith(f"hard {100 * grpo_hard:.1f}%")
    assert rows["(c) SFT alone learns the teacher's skill, in its long form"][-1] == "not run"
    _assert_png(compared / "dynamics_seed0.png")
    _assert_png(compared / "dynamics_mean.png")


def test_compare_reuses_finished_runs(compared, tmp_path, capsys):
    shutil.copytree(compared / "red_seed0", tmp_path / "red_seed0")
    before = (tmp_path / "red_seed0" / "metrics.jsonl").read_text()
    assert main(["compare", "--methods", "red", "--seeds", "0", "--out", str(tmp_path), *TINY_OVERRIDES,
                 "trainer.steps=2", "trainer.save_every=1"]) == 0
    assert "already finished; reusing it" in capsys.readouterr().out
    assert (tmp_path / "red_seed0" / "metrics.jsonl").read_text() == before
    assert "red" in _table_rows((tmp_path / "table.md").read_text())


def test_compare_resumes_an_interrupted_run(compared, tmp_path, capsys):
    """A comparison stopped after grpo's step-1 checkpoint picks that run up there and ends where the
    uninterrupted one did."""
    run_dir = tmp_path / "grpo_seed0"
    shutil.copytree(compared / "grpo_seed0", run_dir)
    (run_dir / "checkpoints" / "latest").write_text("step_000001")
    shutil.rmtree(run_dir / "checkpoints" / "step_000002")
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    (run_dir / "metrics.jsonl").write_text("\n".join(lines[:3]) + "\n")  # steps 0, 1, 2: killed before the end
    assert main(["compare", "--methods", "grpo", "--seeds", "0", "--out", str(tmp_path), *TINY_OVERRIDES,
                 "trainer.steps=2", "trainer.save_every=1", "trainer.progress=false"]) == 0
    assert "(resuming)" in capsys.readouterr().out
    assert _comparable(run_dir) == _comparable(compared / "grpo_seed0")


def test_compare_jobs_trains_in_processes_like_in_process(compared, tmp_path, capsys):
    """--jobs 2: each run is a one-thread `megatron-red train` process (log in RUN_DIR/train.log), the seed's
    student is built once, and every number equals the in-process comparison's."""
    assert main(["compare", "--methods", "red,grpo", "--seeds", "0", "--out", str(tmp_path), "--jobs", "2",
                 *TINY_OVERRIDES, "trainer.steps=2", "trainer.save_every=1"]) == 0
    out = capsys.readouterr().out
    assert out.count("[pid ") == 2 and out.count(" done") == 2
    assert len(list((tmp_path / ".cache").glob("student_*"))) == 1
    logs = [(tmp_path / f"{method}_seed0" / "train.log").read_text() for method in ("red", "grpo")]
    # The second run waited for the first's student: one warm-up in both logs.
    assert sum(log.count("[warm-up] 3 SFT steps on") for log in logs) == 1
    for method in ("red", "grpo"):
        assert (tmp_path / f"{method}_seed0" / "train.log").read_text().count("held-out accuracy on") == 1
        assert _comparable(tmp_path / f"{method}_seed0") == _comparable(compared / f"{method}_seed0")
    assert (tmp_path / "table.md").read_text() == (compared / "table.md").read_text()


def test_compare_jobs_start_the_listed_methods_first_over_all_seeds(tmp_path, monkeypatch):
    """With --jobs, runs start method by method over the seeds, so the longest (listed first) do not start last."""
    from megatron_red.trainer import compare

    started = []

    def record(pending, train_args, jobs):
        started.extend((method, seed) for seed, method, _, _ in pending)
        raise KeyboardInterrupt  # nothing is trained

    monkeypatch.setattr(compare, "_train_processes", record)
    with pytest.raises(KeyboardInterrupt):
        main(["compare", "--methods", "red,grpo,sft", "--seeds", "0,1", "--out", str(tmp_path), "--jobs", "2",
              *TINY_OVERRIDES])
    assert started == [("red", 0), ("red", 1), ("grpo", 0), ("grpo", 1), ("sft", 0), ("sft", 1)]


def test_compare_refuses_runs_of_another_config(compared, tmp_path, capsys):
    shutil.copytree(compared / "red_seed0", tmp_path / "red_seed0")
    before = (tmp_path / "red_seed0" / "metrics.jsonl").read_text()
    assert main(["compare", "--methods", "red", "--seeds", "0", "--out", str(tmp_path), *TINY_OVERRIDES,
                 "trainer.steps=3", "trainer.save_every=1"]) == 2
    err = capsys.readouterr().err
    assert "red_seed0" in err and "trainer.steps: 2 there, 3 now" in err
    assert (tmp_path / "red_seed0" / "metrics.jsonl").read_text() == before


def test_train_prints_the_student_before_training(tmp_path, capsys):
    run_dir = tmp_path / "red"
    assert main(["train", *TINY_OVERRIDES, "trainer.steps=1", f"trainer.out_dir={run_dir}"]) == 0
    out = capsys.readouterr().out
    lines = read_lines(run_dir)
    first, final = lines[0], lines[-1]
    assert first["step"] == 0 and final["final"]
    for label, record in (("red, step 1:", final), ("warmed-up student, step 0:", first)):
        line = next(x for x in out.splitlines() if x.strip().startswith(label))
        assert (f"{100 * record['eval/accuracy']:.1f}% (hard {100 * record['eval/accuracy_hard']:.1f}%, "
                f"easy {100 * record['eval/accuracy_easy']:.1f}%), mean response length "
                f"{record['eval/mean_length']:.1f} tokens") in line
    assert "teacher traces:" in out and f"{final['eval/teacher_length']:.1f} tokens" in out


def test_plot(compared, tmp_path, capsys):
    runs = [str(compared / "red_seed0"), str(compared / "grpo_seed0")]
    assert main(["plot", *runs]) == 0
    assert capsys.readouterr().out.strip() == str(Path(runs[0]) / "dynamics.png")
    _assert_png(Path(runs[0]) / "dynamics.png")
    out = tmp_path / "sub" / "both.png"
    assert main(["plot", *runs, "--out", str(out)]) == 0
    _assert_png(out)


def test_bad_method_is_a_usage_error(tmp_path, capsys):
    assert main(["compare", "--methods", "red,nope", "--out", str(tmp_path / "c"), *TINY_OVERRIDES]) == 2
    assert "nope" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
    assert main(["train", *TINY_OVERRIDES, "algo.method=nope", f"trainer.out_dir={tmp_path / 't'}"]) == 2
    assert "nope" in capsys.readouterr().err


def test_bad_override_is_a_usage_error(tmp_path, capsys):
    assert main(["train", "trainer.stepz=3", f"trainer.out_dir={tmp_path / 't'}"]) == 2
    assert "stepz" in capsys.readouterr().err
    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2


def test_a_bad_value_is_refused_before_any_work(tmp_path, capsys):
    """Validated when loaded: the warm-up of the built-in student (minutes) does not run first."""
    run_dir = tmp_path / "t"
    assert main(["train", *TINY_OVERRIDES, "trainer.save_every=0", f"trainer.out_dir={run_dir}"]) == 2
    out, err = capsys.readouterr()
    assert err == "error: trainer.save_every=0: must be >= 1\n"
    assert "[warm-up]" not in out and not run_dir.exists() and not (tmp_path / ".cache").exists()


def test_plan_names_a_missing_model_path_and_the_architectures(capsys):
    assert main(["plan", "--world-size", "8", "examples/red/qwen25_math_7b_8gpu.yaml"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: model.path=/models/Qwen2.5-Math-7B: ") and "examples/red/architectures/" in err


def test_only_config_errors_become_usage_errors(tmp_path, monkeypatch):
    """A ValueError that is not a ConfigError is a bug: it keeps its traceback (train and eval)."""
    from megatron_red.trainer import export, red_trainer

    def bug(*args, **kwargs):
        raise ValueError("an internal bug")

    monkeypatch.setattr(red_trainer.RedTrainer, "__init__", bug)
    with pytest.raises(ValueError, match="an internal bug"):
        main(["train", *TINY_OVERRIDES, f"trainer.out_dir={tmp_path / 't'}"])
    eval_args = ["eval", "--model", str(tmp_path / "nothing"), "--out", str(tmp_path / "e")]
    assert main(eval_args) == 2  # no model there: a usage error
    monkeypatch.setattr(export, "resolve_hf_model", bug)
    with pytest.raises(ValueError, match="an internal bug"):
        main(eval_args)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_megatron_without_cuda_is_refused_in_seconds(tmp_path):
    """A new user's first try on a CPU machine (issue 32): under torchrun, both ranks stop at once with one line
    naming the key and what to do instead, before the warm-up, the run directory or megatron-core's DDP."""
    from dist_utils import _free_port

    run_dir = tmp_path / "run"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}"]
    start = time.perf_counter()
    result = subprocess.run([*torchrun, "-m", "megatron_red.cli", "train", "model.backend=megatron",
                             "model.tensor_model_parallel_size=2", f"trainer.out_dir={run_dir}"], cwd=REPO_ROOT,
                            env=subprocess_env(), capture_output=True, text=True, timeout=120)
    seconds = time.perf_counter() - start
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode != 0 and len(errors) == 2, result.stderr[-3000:]  # one line per rank
    for line in errors:
        assert line.startswith("error: model.backend=megatron needs CUDA GPUs")
        assert "model.backend=hf" in line and "megatron-red plan CONFIG" in line
    assert "NVIDIA" not in result.stderr and "[warm-up]" not in result.stdout
    assert not run_dir.exists() and not (tmp_path / ".cache").exists()
    assert seconds < 60, seconds  # the imports of two processes on a shared 2-core machine; the warm-up took minutes

    # Without torchrun it is the same one line, exit code 2.
    result = _run("train", "model.backend=megatron", f"trainer.out_dir={run_dir}")
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("error: model.backend=megatron needs CUDA GPUs")
