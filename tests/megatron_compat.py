"""Test-only CPU stand-ins for the CUDA calls megatron-core makes unconditionally.

megatron-core's model forward, pipeline schedules and p2p communication assume a GPU: the rotary embedding moves
its frequencies to `torch.cuda.current_device()`, the schedules allocate token counters with `device="cuda"`,
p2p shape exchange calls `torch.cuda.synchronize()`, and attention dropout runs inside the CUDA RNG tracker.
The MoE token dispatcher copies its split sizes to the host only from CUDA tensors (`maybe_move_tensor_to_cpu`),
where torch's all-to-all takes them, and with expert and sequence parallelism it all-gathers and reduce-scatters
pieces of different sizes, which NCCL does and gloo refuses (equal pieces only). `install()` redirects exactly
these to the CPU (uneven pieces through equal, padded ones) inside a spawned gloo test process, and marks the
process as having them (`megatron_red.megatron_internals.CPU_STAND_INS`), which lifts the package's refusal to
train the Megatron backend without CUDA. It is never imported by the package, and only test processes (never the
pytest parent) call it.
"""
from __future__ import annotations

import collections
import contextlib
import importlib
import types

import torch

_CUDA_ALLOCATORS = ("zeros", "ones", "empty", "full", "tensor", "arange", "empty_like", "zeros_like")
# megatron-core modules that allocate tensors with a literal `device="cuda"`.
_MODULES_WITH_CUDA_TENSORS = (
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.transformer.utils",
    "megatron.core.utils",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.dist_checkpointing.exchange_utils",
    # The dynamic inference engine (rollout/megatron.py): pinned host buffers and device tensors.
    "megatron.core.inference.contexts.dynamic_context",
    "megatron.core.inference.contexts.gpu_view",
    "megatron.core.inference.contexts.kv_block_allocator",
    "megatron.core.inference.contexts.attention_context.mha_metadata",
    "megatron.core.inference.text_generation_controllers.text_generation_controller",
    "megatron.core.inference.engines.dynamic_engine",
    "megatron.core.inference.model_inference_wrappers.abstract_model_inference_wrapper",
    "megatron.core.inference.sampling.torch_sampling",
    "megatron.core.inference.communication_utils",
    "megatron.core.inference.batch_dimensions_utils",
)


def _cpu_device(device):
    if device is None:
        return None
    if isinstance(device, int) or str(device).startswith("cuda"):
        return "cpu"
    return device


class _TorchOnCPU(types.ModuleType):
    """A view of `torch` whose tensor factories map a CUDA device to the CPU (for megatron modules only)."""

    def __init__(self):
        super().__init__("torch")

    def __getattr__(self, name):
        attr = getattr(torch, name)
        if name in _CUDA_ALLOCATORS:
            def factory(*args, __fn=attr, **kwargs):
                if "device" in kwargs:
                    kwargs["device"] = _cpu_device(kwargs["device"])
                kwargs.pop("pin_memory", None)  # page-locked host memory needs a CUDA driver
                return __fn(*args, **kwargs)
            return factory
        return attr


class _Event:
    """A CUDA event on the CPU: work is synchronous, so every event has completed."""

    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None):
        pass

    def synchronize(self):
        pass

    def wait(self, stream=None):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


class _Stream(_Event):
    """A CUDA stream on the CPU (work is synchronous)."""

    def wait_event(self, event):
        pass

    def wait_stream(self, stream):
        pass

    def record_event(self, event=None):
        return event or _Event()


def install() -> None:
    """Redirect megatron-core's CUDA calls to the CPU in this process."""
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.empty_cache = lambda: None
    # Gradient sync waits on CUDA-graph events via the current stream; there are none on the CPU.
    torch.cuda.current_stream = lambda *a, **k: _Stream()
    # The dynamic inference engine times steps with events, copies on a side stream and pins host buffers.
    torch.cuda.Event = _Event
    torch.cuda.Stream = _Stream
    torch.cuda.stream = lambda stream=None: contextlib.nullcontext()
    torch.cuda.memory_stats = lambda *a, **k: collections.defaultdict(int)
    torch.Tensor.pin_memory = lambda self, *args, **kwargs: self

    from megatron.core.tensor_parallel import random as mpu_random

    # Dropout is 0 in every test model; the tracker only swaps CUDA RNG states around it.
    mpu_random.CudaRNGStatesTracker.fork = lambda self, name=None: contextlib.nullcontext()
    # Activation recompute saves / restores the CUDA RNG state around each checkpoint; the CPU one stands in.
    mpu_random._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    mpu_random._set_cuda_rng_state = lambda *args, **kwargs: None

    # megatron's gradient clipping asserts `grad.type() == 'torch.cuda.FloatTensor'`: report CPU tensors as CUDA.
    tensor_type = torch.Tensor.type

    def type_as_cuda(self, *args, **kwargs):
        name = tensor_type(self, *args, **kwargs)
        if args or kwargs or self.is_cuda:
            return name
        return name.replace("torch.", "torch.cuda.", 1)

    torch.Tensor.type = type_as_cuda
    # Tied embeddings: the last pipeline stage moves its copy with `weight.data.cuda()` before syncing it.
    torch.Tensor.cuda = lambda self, *args, **kwargs: self

    from megatron.core.inference import communication_utils
    from megatron.core.inference.contexts import dynamic_context

    # Inference's pipeline send / receive / broadcast assert CUDA tensors (NCCL); gloo moves CPU tensors.
    communication_utils._is_cuda = lambda tensor: None

    # megatron appends K/V to the paged cache with a CUDA-only Triton kernel when Triton is importable; its own
    # torch indexing path is the same operation.
    dynamic_context.triton_append_key_value_cache = None

    from megatron.core.transformer.moe import token_dispatcher

    def to_host(tensor, as_numpy=False, record_stream=False):
        """`maybe_move_tensor_to_cpu` as on a GPU, where every split size it is given lives on the device."""
        return tensor.numpy() if as_numpy and torch.is_tensor(tensor) else tensor

    token_dispatcher.maybe_move_tensor_to_cpu = to_host

    from megatron.core.tensor_parallel import mappings

    gather, reduce_scatter = mappings._gather_along_first_dim, mappings._reduce_scatter_along_first_dim

    def gather_uneven(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or group.size() == 1:
            return gather(input_, group, output_split_sizes, use_global_buffer)
        longest = max(output_split_sizes)
        padded = input_.new_zeros((longest, *input_.shape[1:]))
        padded[:input_.shape[0]] = input_
        pieces = [torch.empty_like(padded) for _ in output_split_sizes]
        torch.distributed.all_gather(pieces, padded, group=group)
        return torch.cat([piece[:n] for piece, n in zip(pieces, output_split_sizes)])

    def reduce_scatter_uneven(input_, group, input_split_sizes=None, use_global_buffer=False):
        if input_split_sizes is None or group.size() == 1:
            return reduce_scatter(input_, group, input_split_sizes, use_global_buffer)
        total = input_.clone()
        torch.distributed.all_reduce(total, group=group)
        start = sum(input_split_sizes[:group.rank()])
        return total[start:start + input_split_sizes[group.rank()]].contiguous()

    mappings._gather_along_first_dim = gather_uneven
    mappings._reduce_scatter_along_first_dim = reduce_scatter_uneven

    proxy = _TorchOnCPU()
    for module_name in _MODULES_WITH_CUDA_TENSORS:
        importlib.import_module(module_name).torch = proxy

    from megatron_red import megatron_internals

    megatron_internals.CPU_STAND_INS = True
