"""examples/red/launch_megatron_multinode.sh under sbatch and by hand, with stand-ins for what a cluster provides.

No cluster here: `scontrol`, `srun` and `torchrun` are stand-in executables first on PATH. `scontrol show hostnames`
prints the job's nodes; `srun` records its options and runs its command once per node, as that node would (its
SLURM_NODEID, the cpus-per-task it was given, the --chdir directory), refusing a script under slurmd's spool
directory on every node but the first (the batch script's copy exists only there: "No such file"); `torchrun`
records its arguments, working directory and environment per node. The batch step runs the way sbatch runs it: a
copy of the script in a private spool directory, started from the submit directory (the repository root).

Checked (issue 33): both nodes run torchrun with their own node rank, the first node as the rendezvous, the node's
cores passed to srun (`--cpus-per-task`) and split over the GPUs' workers (OMP_NUM_THREADS), the network interface
for NCCL and gloo when IFNAME is given, the recipe and the extra overrides; a submit directory without the script is
an error naming LAUNCH_SCRIPT; by hand (NNODES / NODE_RANK / MASTER_ADDR), one node's torchrun.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "red" / "launch_megatron_multinode.sh"
NODES = ["gpu-node-07", "gpu-node-08"]

SCONTROL = """#!/usr/bin/env bash
[[ "$1 $2" == "show hostnames" ]] || {{ echo "stand-in scontrol: unexpected $*" >&2; exit 1; }}
printf '%s\\n' {nodes}
"""

SRUN = """#!{python}
import json, os, subprocess, sys
log, spool = os.environ["STUB_LOG"], os.environ["STUB_SPOOL"]
args, options = sys.argv[1:], {{}}
while args and args[0].startswith("--"):
    key, _, value = args.pop(0)[2:].partition("=")
    options[key] = value
json.dump({{"options": options, "command": args}}, open(os.path.join(log, "srun.json"), "w"))
nodes = int(options.get("nodes", os.environ["SLURM_NNODES"]))  # srun in a job: all its nodes
for node in range(nodes):
    private = [a for a in args if a.startswith(spool)]
    if node > 0 and private:
        print(f"slurmstepd: bash: {{private[0]}}: No such file or directory", file=sys.stderr)
        sys.exit(127)  # --kill-on-bad-exit ends the job
    env = dict(os.environ, SLURM_NODEID=str(node), SLURM_PROCID=str(node), SLURM_NNODES=str(nodes))
    if "cpus-per-task" in options:
        env["SLURM_CPUS_PER_TASK"] = options["cpus-per-task"]
    done = subprocess.run(args, cwd=options.get("chdir"), env=env)
    if done.returncode:
        sys.exit(done.returncode)
"""

TORCHRUN = """#!{python}
import json, os, sys
keep = ("MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS", "CUDA_DEVICE_MAX_CONNECTIONS", "NCCL_SOCKET_IFNAME",
        "GLOO_SOCKET_IFNAME", "SLURM_NODEID")
rank = next(a.split("=", 1)[1] for a in sys.argv if a.startswith("--node_rank="))
json.dump({{"argv": sys.argv[1:], "cwd": os.getcwd(), "env": {{k: os.environ.get(k) for k in keep}}}},
          open(os.path.join(os.environ["STUB_LOG"], f"torchrun.{{rank}}.json"), "w"))
"""


@pytest.fixture
def cluster(tmp_path):
    """Stand-in executables on PATH, a log directory and slurmd's spool directory; returns a runner."""
    stubs, log, spool = tmp_path / "bin", tmp_path / "log", tmp_path / "var" / "spool" / "slurmd" / "job42"
    for d in (stubs, log, spool):
        d.mkdir(parents=True)
    for name, text in (("scontrol", SCONTROL.format(nodes=" ".join(NODES))),
                       ("srun", SRUN.format(python=sys.executable)),
                       ("torchrun", TORCHRUN.format(python=sys.executable))):
        (stubs / name).write_text(text)
        (stubs / name).chmod(0o755)

    def run(argv: list[str], cwd: Path = ROOT, **env) -> subprocess.CompletedProcess:
        full = dict(os.environ, PATH=f"{stubs}{os.pathsep}{os.environ['PATH']}", STUB_LOG=str(log),
                    STUB_SPOOL=str(spool), **env)
        for key in ("SLURM_JOB_ID", "INSIDE_SRUN", "NNODES", "NODE_RANK", "MASTER_ADDR", "IFNAME", "OMP_NUM_THREADS",
                    "CPUS_PER_NODE", "SLURM_CPUS_PER_TASK", "LAUNCH_SCRIPT"):
            if key not in env:
                full.pop(key, None)
        return subprocess.run(argv, cwd=cwd, env=full, capture_output=True, text=True, timeout=60)

    def sbatch(*args: str, submit_dir: Path = ROOT, **env) -> subprocess.CompletedProcess:
        """What sbatch does: slurmd copies the batch script into its spool directory and runs it there."""
        copy = spool / "slurm_script"
        shutil.copy(SCRIPT, copy)
        slurm = dict(SLURM_JOB_ID="42", SLURM_JOB_NODELIST="gpu-node-[07-08]", SLURM_NNODES="2",
                     SLURM_JOB_NUM_NODES="2", SLURM_SUBMIT_DIR=str(submit_dir), SLURM_NODEID="0")
        return run(["bash", str(copy), *args], cwd=submit_dir, **{**slurm, **env})

    def recorded(name: str) -> dict:
        return json.loads((log / f"{name}.json").read_text())

    return sbatch, run, recorded, log


def test_sbatch_starts_torchrun_on_every_node_from_the_submit_directory(cluster):
    sbatch, _, recorded, log = cluster
    done = sbatch("trainer.steps=3", SLURM_CPUS_PER_TASK="96", IFNAME="ib0")
    assert done.returncode == 0, done.stderr
    srun = recorded("srun")
    assert srun["options"] == {"nodes": "2", "ntasks-per-node": "1", "cpus-per-task": "96", "kill-on-bad-exit": "1",
                               "chdir": str(ROOT)}
    assert srun["command"] == ["bash", str(SCRIPT), "trainer.steps=3"]  # the copy every node reads
    for node in range(2):
        run = recorded(f"torchrun.{node}")
        assert run["argv"] == ["--nnodes=2", f"--node_rank={node}", "--nproc_per_node=8",
                               f"--master_addr={NODES[0]}", "--master_port=29500", "-m", "megatron_red.cli", "train",
                               "--config", "examples/red/qwen25_32b_16gpu.yaml", "model.backend=megatron",
                               "trainer.steps=3"]
        assert run["cwd"] == str(ROOT) and (ROOT / "examples/red/qwen25_32b_16gpu.yaml").is_file()
        assert run["env"] == {"MASTER_ADDR": NODES[0], "MASTER_PORT": "29500", "OMP_NUM_THREADS": "12",
                              "CUDA_DEVICE_MAX_CONNECTIONS": "1", "NCCL_SOCKET_IFNAME": "ib0",
                              "GLOO_SOCKET_IFNAME": "ib0", "SLURM_NODEID": str(node)}
    assert sorted(p.name for p in log.iterdir()) == ["srun.json", "torchrun.0.json", "torchrun.1.json"]


def test_sbatch_without_cpus_per_task_leaves_srun_the_default_and_threads_follow_the_node(cluster):
    sbatch, _, recorded, _ = cluster
    done = sbatch(CPUS_PER_NODE="16", GPUS_PER_NODE="4")
    assert done.returncode == 0, done.stderr
    assert recorded("srun")["options"]["cpus-per-task"] == "16"
    assert recorded("torchrun.1")["env"]["OMP_NUM_THREADS"] == "4"
    assert "--nproc_per_node=4" in recorded("torchrun.1")["argv"]


def test_sbatch_from_elsewhere_names_launch_script(cluster, tmp_path):
    sbatch, _, _, log = cluster
    elsewhere = tmp_path / "home"
    elsewhere.mkdir()
    done = sbatch(submit_dir=elsewhere)
    assert done.returncode == 2 and "LAUNCH_SCRIPT" in done.stderr and not (log / "srun.json").exists()
    done = sbatch(submit_dir=elsewhere, LAUNCH_SCRIPT=str(SCRIPT))
    assert done.returncode == 0, done.stderr


def test_by_hand_one_node_of_several(cluster):
    _, run, recorded, _ = cluster
    done = run(["bash", str(SCRIPT), "trainer.seed=1"], NNODES="2", NODE_RANK="1", MASTER_ADDR="10.0.0.7",
               CPUS_PER_NODE="64", TP="4")
    assert done.returncode == 0, done.stderr
    torchrun = recorded("torchrun.1")
    assert torchrun["argv"][:5] == ["--nnodes=2", "--node_rank=1", "--nproc_per_node=8", "--master_addr=10.0.0.7",
                                    "--master_port=29500"]
    assert torchrun["argv"][-3:] == ["model.backend=megatron", "model.tensor_model_parallel_size=4", "trainer.seed=1"]
    assert torchrun["env"]["OMP_NUM_THREADS"] == "8" and torchrun["env"]["NCCL_SOCKET_IFNAME"] is None
