"""Test-only launcher: `python tests/pause_at_step.py STEP MARKER train ARGS...` runs `megatron-red train ARGS`
and, once the line of step STEP is in metrics.jsonl, writes MARKER and blocks, so a test can kill the run at
exactly that point (tests/test_trainer_resume.py). The blocking is bounded so an orphaned run still ends."""
import sys
import time
from pathlib import Path

from megatron_red.cli import main
from megatron_red.trainer.metrics import MetricsLog

BLOCK_S = 600


def pause_after(step: int, marker: Path):
    log = MetricsLog.log

    def log_then_pause(self, logged_step, metrics):
        log(self, logged_step, metrics)
        if logged_step == step and not metrics.get("final"):
            marker.write_text(str(step))
            time.sleep(BLOCK_S)
            sys.exit(f"pause_at_step: not killed within {BLOCK_S} s")

    MetricsLog.log = log_then_pause


if __name__ == "__main__":
    pause_after(int(sys.argv[1]), Path(sys.argv[2]))
    sys.exit(main(sys.argv[3:]))
