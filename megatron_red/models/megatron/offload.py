"""`OptimizerOffload`: megatron's optimizer state to host memory while the rollout engine generates, and back.

What moves: every tensor of each inner optimizer's state (Adam's two moments; not `step`) and, for a 16-bit model,
the fp32 master weights (in an fp32 model they are views of the parameters, which stay on the GPU).

How: each tensor has a host buffer, allocated at the first offload and reused by every later one, page-locked
(pinned) on CUDA; offloading copies into it without blocking and synchronises once after all copies, onloading
allocates the device tensor and copies from the buffer without blocking (stream order makes the next kernels wait
for it; the buffer is written again only by the next offload, later on the same stream). megatron-core's own
`offload_to_cpu` / `restore_from_cpu` copy synchronously into freshly allocated pageable memory, one tensor at a
time. The trade-off: the buffers hold host memory equal to the offloaded state for the whole run (pinned memory
cannot be swapped), where the pageable copies exist only during generation. tools/gpu_checks.sh's `offload` step
measures both (tools/offload_bench.py).

Off CUDA the buffers are ordinary CPU tensors and "device" is the CPU: the copies still happen, so the CPU tests
exercise the same code path.
"""
from __future__ import annotations

import torch


class OptimizerOffload:
    """Moves `optimizer`'s state (megatron's ChainedOptimizer) to host buffers and back.

    master_weights: also move each inner optimizer's parameters (a 16-bit model's fp32 master weights).
    """

    def __init__(self, optimizer, master_weights: bool):
        self.optimizer, self.master_weights = optimizer, master_weights
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
            else torch.device("cpu")
        self.host: dict[tuple[int, str], torch.Tensor] = {}
        self.offloaded = False

    def _slots(self):
        """(parameter, key, holder, tensor) of every tensor that moves: a master weight (key "data", holder = the
        parameter: its `.data` moves) or an entry of a parameter's optimizer state (holder = that state dict).
        Buffers are kept per (parameter, key): the parameters live as long as the optimizer."""
        for opt in self.optimizer.chained_optimizers:
            inner = opt.optimizer
            if self.master_weights:
                for group in inner.param_groups:
                    for p in group["params"]:
                        yield p, "data", p, p.data
            for p, state in inner.state.items():
                for key, value in state.items():
                    if torch.is_tensor(value) and key != "step":
                        yield p, key, state, value

    @staticmethod
    def _set(holder, key: str, value: torch.Tensor) -> None:
        if key == "data":
            holder.data = value
        else:
            holder[key] = value

    def _buffer(self, param, key: str, like: torch.Tensor) -> torch.Tensor:
        buffer = self.host.get((id(param), key))
        if buffer is None or buffer.shape != like.shape or buffer.dtype != like.dtype:
            buffer = torch.empty(like.shape, dtype=like.dtype, device="cpu", pin_memory=self.device.type == "cuda")
            self.host[(id(param), key)] = buffer
        return buffer

    def offload(self) -> None:
        """Every moving tensor into its host buffer; the device copies are released."""
        if self.offloaded:
            return
        for param, key, holder, value in list(self._slots()):
            buffer = self._buffer(param, key, value)
            buffer.copy_(value, non_blocking=True)
            self._set(holder, key, buffer)
        if self.device.type == "cuda":
            torch.cuda.current_stream().synchronize()  # the buffers are complete; the device memory is free
            torch.cuda.empty_cache()
        self.offloaded = True

    def onload(self) -> None:
        """Every moving tensor back on the device (new device tensors; the host buffers stay for the next offload)."""
        if not self.offloaded:
            return
        for _, key, holder, buffer in list(self._slots()):
            self._set(holder, key, buffer.to(self.device, non_blocking=True, copy=True))
        self.offloaded = False
