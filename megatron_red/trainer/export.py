"""`megatron-red export`, and the model directories `megatron-red eval --model` accepts.

A run leaves its model as `RUN_DIR/hf/` (the final model, written when training ends), as `hf/` inside each
checkpoint (with `trainer.save_hf`), and as the checkpoints themselves (the training state: `policy.pt` for the
Hugging Face backend, a megatron-core dist_checkpointing directory for the Megatron backend, each with
`hf_config/`: config.json and tokenizer). `export_checkpoint` turns a checkpoint into a Hugging Face directory
(safetensors shards + `model.safetensors.index.json` + config + tokenizer):

- Hugging Face backend: `policy.pt` is memory-mapped (`torch.load(mmap=True)`), so the optimiser state in it is
  never read, and the model's tensors are written one at a time.
- Megatron backend: every rank of the current world builds its stage of the model at `tp` x `pp` (their product
  must be the world size) and loads its shard of the checkpoint (dist_checkpointing reshards from the saved
  layout); the weights are then streamed to one writer (`save_hf_pretrained`). Without torchrun the world is this
  process alone at TP = PP = 1, which holds the whole model (no second copy of it): fine when the model fits one
  device; larger ones run under `torchrun --nproc_per_node=N -m megatron_red.cli export ... --tp N`.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import torch

from megatron_red.config import ModelConfig, TrainerConfig
from megatron_red.distributed import barrier, init_distributed, is_main_process
from megatron_red.errors import ConfigError
from megatron_red.models.hf_checkpoint import INDEX_FILE, is_hf_checkpoint, save_state_dict
from megatron_red.models.precision import DTYPES
from megatron_red.trainer.checkpoint import HF_CONFIG_DIR, HF_DIR, latest_checkpoint

EXPORT_MARKER = "megatron_red_export.json"


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory itself, or the latest checkpoint of a run directory."""
    path = Path(path)
    if (path / "trainer.pt").is_file():
        return path
    if (path / "checkpoints").is_dir():
        latest = latest_checkpoint(path)
        if latest is None:
            raise ConfigError(f"{path}: the run has no complete checkpoint (checkpoints/latest missing)")
        return latest
    raise ConfigError(f"{path}: neither a run directory (checkpoints/) nor a checkpoint (trainer.pt)")


def _load_hf_config(checkpoint: Path):
    from transformers import AutoConfig

    meta = checkpoint / HF_CONFIG_DIR
    if not (meta / "config.json").is_file():
        raise ConfigError(f"{checkpoint}: no {HF_CONFIG_DIR}/config.json (the model config every checkpoint "
                          f"holds); was it written by an older version?")
    return AutoConfig.from_pretrained(str(meta), local_files_only=True)


def _training_dtype(hf_config) -> str:
    name = str(getattr(hf_config, "dtype", None) or "float32").removeprefix("torch.")
    if name not in DTYPES:
        raise ConfigError(f"{HF_CONFIG_DIR}/config.json has dtype {name!r}; expected one of {sorted(DTYPES)}")
    return name


def export_checkpoint(path: str | Path, out: str | Path, dtype: torch.dtype | None = None, tp: int = 1,
                      pp: int = 1) -> Path:
    """Write the model of a run (its latest checkpoint) or of a checkpoint as a Hugging Face directory `out`.

    dtype: of the written weights (None: the parameters' dtype). tp, pp: Megatron checkpoints only, the layout
    this world loads the checkpoint at (see the module docstring). Collective under torchrun.
    """
    from megatron_red.models.megatron.checkpoint import is_megatron_checkpoint

    checkpoint = resolve_checkpoint(path)
    out = Path(out)
    hf_config = _load_hf_config(checkpoint)
    megatron = not (checkpoint / "policy.pt").is_file()
    if megatron:
        if not is_megatron_checkpoint(str(checkpoint)):
            raise ConfigError(f"{checkpoint}: neither policy.pt (Hugging Face backend) nor a Megatron "
                              f"checkpoint")
        init_distributed(TrainerConfig.dist_timeout_minutes, single_process=True)
    if is_main_process() and out.is_dir():  # an earlier export here: none of its weights may survive
        for stale in [*out.glob("model-*.safetensors"), out / INDEX_FILE, out / EXPORT_MARKER]:
            stale.unlink(missing_ok=True)
    barrier()
    if not megatron:
        if is_main_process():
            state = torch.load(checkpoint / "policy.pt", map_location="cpu", mmap=True, weights_only=False)
            save_state_dict(state["model"], hf_config, out, dtype)
    else:
        _export_megatron(checkpoint, out, hf_config, dtype, tp, pp)
    if is_main_process():
        for file in (checkpoint / HF_CONFIG_DIR).iterdir():
            if file.name != "config.json" and file.is_file():
                shutil.copy2(file, out / file.name)
        (out / EXPORT_MARKER).write_text(json.dumps({"source": str(checkpoint.resolve())}))
    barrier()
    return out


def _export_megatron(checkpoint: Path, out: Path, hf_config, dtype, tp: int, pp: int) -> None:
    import torch.distributed as dist

    from megatron_red.megatron_internals import megatron_runs_here
    from megatron_red.models.architectures import num_experts
    from megatron_red.models.megatron.checkpoint import load_model_weights
    from megatron_red.models.megatron.policy import MegatronConfig, build_sharded_model, save_hf_pretrained
    from megatron_red.trainer.build import parallel_layout

    if tp * pp != dist.get_world_size():
        raise ConfigError(f"--tp {tp} x --pp {pp} must equal the number of processes ({dist.get_world_size()}); "
                          f"run under torchrun --nproc_per_node={tp * pp}, or change --tp / --pp")
    if num_experts(hf_config) and not megatron_runs_here():
        raise ConfigError(f"{checkpoint} holds a mixture of experts, whose megatron-core layers need a CUDA GPU even "
                          "to be built (the token dispatcher makes a CUDA stream), and torch sees none here: export "
                          "on a GPU machine, or take the run's hf/ (written at the end of training; "
                          "trainer.save_hf=true writes one into every checkpoint)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    layout = parallel_layout(ModelConfig(backend="megatron", tensor_model_parallel_size=tp,
                                         pipeline_model_parallel_size=pp, dtype=_training_dtype(hf_config)),
                             tp * pp, device, num_experts(hf_config))
    _, model, _ = build_sharded_model(hf_config, None, MegatronConfig(**dataclasses.asdict(layout)))
    load_model_weights(model, str(checkpoint))
    save_hf_pretrained(model, hf_config, str(out), dtype)


def resolve_hf_model(path: str | Path, scratch: str | Path, tp: int = 1, pp: int = 1) -> Path:
    """The Hugging Face directory for `eval --model PATH`: PATH itself when it is one; a run's `hf/` (else its
    latest checkpoint); a checkpoint's `hf/`, else the checkpoint exported into `scratch` (reused while it holds
    a complete export of the same checkpoint) by this world at TP `tp` x PP `pp` (`export_checkpoint`)."""
    path = Path(path)
    if is_hf_checkpoint(path):
        return path
    if (path / "checkpoints").is_dir() and is_hf_checkpoint(path / HF_DIR):
        return path / HF_DIR
    checkpoint = resolve_checkpoint(path)
    if is_hf_checkpoint(checkpoint / HF_DIR):
        return checkpoint / HF_DIR
    scratch = Path(scratch)
    marker = scratch / EXPORT_MARKER
    if (scratch / INDEX_FILE).is_file() and marker.is_file() and \
            json.loads(marker.read_text()).get("source") == str(checkpoint.resolve()):
        return scratch
    print(f"[export] {checkpoint} -> {scratch}")
    return export_checkpoint(checkpoint, scratch, tp=tp, pp=pp)
