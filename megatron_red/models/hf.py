"""The Hugging Face policy backend: a transformers causal LM (Qwen2 / Llama / Qwen3 architectures) on one device.

Log-probs and entropies are computed from the decoder's final hidden states at the loss-mask positions only
(response and trace tokens), so the LM head never runs on prompt or padding tokens. The head is either the
fused Triton kernel (`megatron_red.kernels`, no [N, V] logits tensor) or plain logits followed by
`megatron_red.kernels.vocab_parallel_logprobs_entropy`.

Precision: parameters, gradients and optimiser state stay fp32 (a bf16 master copy would drop RED's 2e-6
updates below bf16's resolution); activations run in `dtype` under autocast (bf16 on GPU, fp32 on CPU).

Mixtures of experts (Qwen3-MoE, Qwen2-MoE): the forwards replay the local engine's recorded experts (the batch's
`routed_experts`, `moe_routing_replay`) through hooks on the routers (rollout/hf_routing.py), and the training
forwards report the routing counts (`moe_routing_*`, `moe_aux_loss_*`) with the first micro-batch's metrics.
"""
from __future__ import annotations

import contextlib
import os
from typing import Literal

import torch

from megatron_red.batch import NOT_RECORDED, SequenceBatch
from megatron_red.kernels import FUSED_KERNEL_MODES, fused_kernel_enabled
from megatron_red.models.architectures import check_supported
from megatron_red.models.base import LossFn, PolicyBackend
from megatron_red.models.hf_checkpoint import checkpoint_tensors
from megatron_red.models.optim import OptimConfig, build_optimizer, clip_grad_norm
from megatron_red.rollout.hf_routing import RouterHooks

FusedKernelMode = Literal["auto", "on", "off"]


class HFPolicy(PolicyBackend):
    """A trainable transformers causal LM.

    model:          the HF module (`AutoModelForCausalLM`); `.model` is shared with the local rollout engine.
    optim_config:   AdamW + schedule + clipping.
    device:         where the model lives (default: CUDA if available, else CPU).
    dtype:          activation dtype (default bf16 on CUDA, fp32 on CPU); parameters stay fp32.
    fused_kernel:   "auto" (fused Triton LM head on CUDA), "on" (always fused; CPU uses the
                    kernel module's torch fallback), "off" (logits + vocab-parallel log-softmax).
    gradient_checkpointing: recompute each decoder layer in backward (less memory, ~1/3 more compute).
    moe_routing_replay: a mixture of experts: route the tokens the engine recorded to its experts (module
                    docstring; `model.moe_routing_replay`).
    """

    def __init__(self, model: torch.nn.Module, optim_config: OptimConfig | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                 fused_kernel: FusedKernelMode = "auto", gradient_checkpointing: bool = False,
                 moe_routing_replay: bool = True):
        check_supported(model.config)
        if fused_kernel not in FUSED_KERNEL_MODES:
            raise ValueError(f"fused_kernel must be one of {FUSED_KERNEL_MODES}, got {fused_kernel!r}")
        lm_head = model.get_output_embeddings()
        if getattr(lm_head, "bias", None) is not None:
            raise ValueError("an LM head with a bias is not supported (Qwen2, Llama and Qwen3 heads have none)")
        self.device = torch.device(device) if device is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = dtype if dtype is not None else (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.model = model.to(device=self.device, dtype=torch.float32)
        self.model.config.use_cache = False
        # transformers builds the input embedding with padding_idx = pad_token_id, which zeroes the gradient of the
        # pad row wherever the pad id is an input. Padded positions get no gradient anyway (masked out), but a
        # sampled pad token is a real token of a response; the megatron backend has no such rule, so neither do we.
        self.model.get_input_embeddings().padding_idx = None
        if gradient_checkpointing:
            if hasattr(self.model, "activation_checkpointing_enable"):  # transformers >= 5 renamed it
                self.model.activation_checkpointing_enable({"use_reentrant": False})
            else:
                self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.fused_kernel = fused_kernel
        self.optim_config = optim_config or OptimConfig()
        self.optimizer, self.scheduler = build_optimizer(self.model.named_parameters(), self.optim_config)
        self.router_hooks = RouterHooks(self.model)
        self.moe_routing_replay = moe_routing_replay

    @classmethod
    def from_pretrained(cls, path: str, optim_config: OptimConfig | None = None,
                        device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                        fused_kernel: FusedKernelMode = "auto", gradient_checkpointing: bool = False,
                        attn_implementation: str = "sdpa", moe_routing_replay: bool = True) -> "HFPolicy":
        """Load a local checkpoint directory (no hub access)."""
        from transformers import AutoModelForCausalLM

        if not os.path.isdir(path):
            raise ValueError(f"checkpoint directory {path!r} does not exist")
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32,
                                                     attn_implementation=attn_implementation)
        return cls(model, optim_config, device, dtype, fused_kernel, gradient_checkpointing, moe_routing_replay)

    @classmethod
    def from_config(cls, hf_config, optim_config: OptimConfig | None = None,
                    device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                    fused_kernel: FusedKernelMode = "auto", gradient_checkpointing: bool = False,
                    seed: int | None = None) -> "HFPolicy":
        """A randomly initialised model from a transformers config (e.g. a tiny `Qwen2Config` for tests)."""
        from transformers import AutoModelForCausalLM

        if seed is not None:
            torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
        return cls(model, optim_config, device, dtype, fused_kernel, gradient_checkpointing)

    # ---- forward ------------------------------------------------------------------------------------------

    def _use_fused(self) -> bool:
        return fused_kernel_enabled(self.fused_kernel, self.device)

    def _autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def _token_logprobs_entropy(self, mb: SequenceBatch, temperature: float,
                                training: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """[b, L-1] fp32 log-probs and entropies on `self.device`, zero outside the loss mask (grad-enabled
        if the caller is); a mixture of experts replays `mb`'s recorded experts (counted when `training`)."""
        if self.router_hooks.routers:
            recorded = mb.fields.get("routed_experts")
            if recorded is not None:  # [b, L-1, ...] -> every position, batch-major [b * L, ...]
                recorded = torch.nn.functional.pad(recorded, (0, 0, 0, 0, 0, 1), value=NOT_RECORDED)
                recorded = recorded.reshape(-1, *recorded.shape[2:])
            self.router_hooks.replay(recorded, self.moe_routing_replay, count=training)
        input_ids = mb.input_ids.to(self.device)
        attention_mask = mb.attention_mask.to(self.device)
        mask = mb.loss_mask.to(self.device).bool()
        with self._autocast():
            hidden = self.model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                              use_cache=False).last_hidden_state
        # Pack the response/trace positions: the head (the expensive [N, V] part) runs on those tokens only.
        hidden_sel = hidden[:, :-1][mask]
        targets = input_ids[:, 1:][mask]
        weight = self.model.get_output_embeddings().weight  # tied or not, this is the head's parameter
        if self._use_fused():
            from megatron_red.kernels import fused_linear_logprobs_entropy

            logprobs, entropy = fused_linear_logprobs_entropy(
                hidden_sel.to(self.dtype), weight.to(self.dtype), targets, temperature=temperature)
        else:
            from megatron_red.kernels import vocab_parallel_logprobs_entropy

            # Scaling the hidden states is the same as scaling the logits (no bias) and avoids an fp32 [N, V] copy;
            # the log-softmax itself runs in fp32 chunks whatever the logits' dtype.
            with self._autocast():
                logits = torch.nn.functional.linear(hidden_sel / temperature, weight)
            logprobs, entropy = vocab_parallel_logprobs_entropy(logits, targets)
        zeros = torch.zeros(mask.shape, dtype=torch.float32, device=self.device)
        return zeros.masked_scatter(mask, logprobs.float()), zeros.masked_scatter(mask, entropy.float())

    def get_inference_log_probs(self, batch: SequenceBatch, micro_batch_size: int,
                                temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        _check_args(micro_batch_size, temperature)
        out = torch.zeros(2, *batch.loss_mask.shape, dtype=torch.float32)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                for rows in batch.micro_batch_rows(micro_batch_size):
                    lp, ent = self._token_logprobs_entropy(batch.select(rows).trimmed(), temperature)
                    width = lp.shape[1]  # micro-batches are trimmed of all-padding columns
                    out[0, rows, :width] = lp.cpu()
                    out[1, rows, :width] = ent.cpu()
        finally:
            self.router_hooks.off()
            self.model.train(was_training)
        return out[0], out[1]

    def get_loss_and_metrics(self, batch: SequenceBatch, micro_batch_size: int, loss_fn: LossFn,
                             temperature: float = 1.0) -> list[dict[str, float]]:
        _check_args(micro_batch_size, temperature)
        self.model.train()  # HF only checkpoints layers in training mode; the model has no dropout (see __init__)
        metrics = []
        try:
            for rows in batch.micro_batch_rows(micro_batch_size):
                mb = batch.select(rows).trimmed().to(self.device)
                logprobs, entropy = self._token_logprobs_entropy(mb, temperature, training=True)
                loss, mb_metrics = loss_fn(logprobs, entropy, mb)
                loss.backward()  # (checkpointed layers replay the same experts while recomputed)
                metrics.append(dict(mb_metrics))
        finally:
            self.router_hooks.off()
        if self.router_hooks.routers and metrics:
            metrics[0].update(self.router_hooks.statistics())
        return metrics

    # ---- optimiser ----------------------------------------------------------------------------------------

    def restart_optimizer(self, optim: OptimConfig) -> None:
        self.optim_config = optim
        self.optimizer, self.scheduler = build_optimizer(self.model.named_parameters(), optim)

    def scale_gradients(self, factor: float) -> None:
        for p in self.model.parameters():
            if p.grad is not None:
                p.grad.mul_(factor)

    def optimizer_step(self, lr_scale: float = 1.0, advance_schedule: bool = True) -> float:
        grad_norm = clip_grad_norm(self.model.parameters(), self.optim_config.grad_clip)
        scheduled = [group["lr"] for group in self.optimizer.param_groups]
        for group in self.optimizer.param_groups:
            group["lr"] *= lr_scale
        self.optimizer.step()
        for group, lr in zip(self.optimizer.param_groups, scheduled):
            group["lr"] = lr
        if advance_schedule:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    @property
    def learning_rate(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def named_hf_weights(self):
        """The module's own parameters (fp32 master weights), detached, under their checkpoint names (a mixture of
        experts' stacked experts as per-expert views, `checkpoint_tensors`); a tied head once, as the embedding."""
        params = {name: param.detach() for name, param in self.model.named_parameters()}
        yield from checkpoint_tensors(params).items()

    # ---- checkpoints --------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        missing = {"model", "optimizer", "scheduler"} - set(state)
        if missing:
            raise ValueError(f"policy state is missing {sorted(missing)}")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    @property
    def hf_config(self):
        return self.model.config

    def save_pretrained(self, path: str, dtype: torch.dtype | None = None) -> None:
        from megatron_red.models.hf_checkpoint import save_state_dict

        save_state_dict(self.model.state_dict(), self.model.config, path, dtype)


def _check_args(micro_batch_size: int, temperature: float) -> None:
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
