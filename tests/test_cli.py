"""`megatron-red`: help texts, `compare` (Table-2-style report and dynamics plots), `plot`, and usage errors."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
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
                 "trainer.steps=2"])
    assert code == 0
    return out


def test_compare_writes_table_and_plot(compared):
    table = (compared / "table.md").read_text().splitlines()
    assert table[0].startswith("| method | seeds | acc (%)")
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in table[2:]}
    assert set(rows) == {"red", "grpo"}
    for method, cells in rows.items():
        run_dir = compared / f"{method}_seed0"
        lines = read_lines(run_dir)
        assert [r["step"] for r in lines] == [1, 2, 2] and lines[-1]["final"]
        final = lines[-1]
        assert cells[0] == "1"  # one seed
        assert cells[1] == f"{100 * final['eval/accuracy']:.1f}"
        assert cells[4] == f"{final['eval/mean_length']:.1f}"
        assert yaml.safe_load((run_dir / "config.yaml").read_text())["algo"]["method"] == method
    _assert_png(compared / "dynamics_seed0.png")


def test_compare_reuses_finished_runs(compared, tmp_path, capsys):
    shutil.copytree(compared / "red_seed0", tmp_path / "red_seed0")
    before = (tmp_path / "red_seed0" / "metrics.jsonl").read_text()
    assert main(["compare", "--methods", "red", "--seeds", "0", "--out", str(tmp_path), *TINY_OVERRIDES,
                 "trainer.steps=2"]) == 0
    assert "already finished; reusing it" in capsys.readouterr().out
    assert (tmp_path / "red_seed0" / "metrics.jsonl").read_text() == before
    assert [line.split("|")[1].strip() for line in (tmp_path / "table.md").read_text().splitlines()[2:]] == ["red"]


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
