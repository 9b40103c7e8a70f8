"""Rollouts from the training `GPTModel` itself: megatron-core's dynamic inference engine on the policy's TP x PP
shards (no weight copy, no gather).

The chain is megatron-core's own: `DynamicInferenceContext` (paged KV cache in blocks of `block_size_tokens`,
continuous batching, optional prefix sharing) -> `GPTInferenceWrapper` (the forward, through the pipeline stages
when PP > 1, logits gathered over TP) -> `TextGenerationController` -> `DynamicInferenceEngine` (requests in, one
`step_modern()` per forward). Attention goes through `rollout/megatron_attention.py` (flash-attn, or our paged
attention without it).

What this module adds is sampling. megatron's sampler draws from one generator per rank; ours replaces it behind
megatron's `Sampling` interface and draws row r's t-th token with `uniforms[r, t]` of the call's seed
(`rollout/sampling.py`, the local engine's rule): every rank of a model-parallel group holds the same gathered
logits, so every rank samples the same tokens with no broadcast, and a row's tokens do not depend on which other
rows megatron batches it with. The behaviour log-probs are those of the sampling distribution (temperature,
top-k, top-p; padded vocabulary ids excluded), taken from the same tensor the token was drawn from. A checksum
all-reduced over the model-parallel group after each call turns any divergence into an error.

Memory between phases: `suspend()` releases the KV cache (and megatron's CUDA graphs, which point into it) until
the next `generate`; with `release_kv_cache=False` it stays allocated.

Mixtures of experts: megatron's engine records, for every position it runs, the experts each MoE layer of this
stage chose (the model's routers carry parallel/routing.py's hooks); this engine files each step's record by
request and position as megatron stores it (megatron's own per-request rebuild loses a finished request's last
block when another request takes it over in the same step: megatron_internals.intercept_routing), the positions of
prefix-shared prompt blocks from megatron's records of those blocks, and a completion carries them
(`Completion.routed_experts`) for the trainer to replay. Under expert parallelism the ranks of an expert-parallel
group (data-parallel replicas with their own prompts) exchange tokens in every MoE layer, so they step together: a
rank whose requests are done runs megatron's idle forward (`dummy_forward`) until every rank of the group is done.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.distributed as dist

from megatron_red.batch import NOT_RECORDED
from megatron_red.distributed import check_same_tokens
from megatron_red.errors import ConfigError
from megatron_red.megatron_internals import intercept_routing, prefill_token_counts, set_sampling
from megatron_red.parallel.routing import end_recording
from megatron_red.rollout.base import Completion, RolloutEngine, SamplingParams
from megatron_red.rollout.megatron_attention import select_inference_attention
from megatron_red.rollout.sampling import check_params, draw_uniforms, sample_tokens, sampling_logprobs

# megatron's per-step token budget (it also bounds a prompt: chunked prefill stays off).
DEFAULT_STEP_TOKENS = 16384


def engine_max_requests(max_batch_size: int, tensor_model_parallel_size: int) -> int:
    """megatron's max_requests for rollout.max_batch_size rows: rounded up to a multiple of TP (its requirement)."""
    return -(-max_batch_size // tensor_model_parallel_size) * tensor_model_parallel_size


def engine_step_tokens(max_requests: int, max_sequence_length: int) -> int:
    """megatron's max_tokens: the tokens one engine step runs (at least one whole prompt, one per request)."""
    return max(DEFAULT_STEP_TOKENS, max_sequence_length, max_requests)


# The KV cache's geometry as megatron-core 0.19's DynamicInferenceContext computes it: the engine sizes its buffer
# with it, and `megatron-red plan`'s memory model (models/megatron/memory.py) counts the same bytes.
def kv_heads_per_rank(num_query_groups: int, tensor_model_parallel_size: int) -> int:
    """Key-value heads one TP rank caches (megatron replicates them when TP exceeds the groups)."""
    return max(1, num_query_groups // tensor_model_parallel_size)


def kv_block_bytes(layers: int, kv_heads: int, head_dim: int, block_size_tokens: int, itemsize: int) -> int:
    """Bytes of one KV block of this stage's `layers` (megatron's `block_size_bytes`: K and V, `kv_heads` per rank)."""
    return 2 * layers * block_size_tokens * kv_heads * head_dim * itemsize


def kv_buffer_blocks(kv_buffer_gb: float, block_bytes: int) -> int:
    """Blocks megatron-core 0.19's DynamicInferenceContext allocates for `buffer_size_gb` (no paused buffer, no
    unified memory): at least 2, one of them its dummy block."""
    return max(2, int(kv_buffer_gb * 1024**3) // block_bytes)


def default_kv_buffer_gb(requests: int, sequence_length: int, block_size_tokens: int, block_bytes: int) -> float:
    """The engine's buffer when rollout.kv_buffer_gb is unset: every row at full length, plus the dummy block."""
    return (requests * math.ceil(sequence_length / block_size_tokens) + 1) * block_bytes / 1024**3


def sequences_held(blocks: int, sequence_length: int, block_size_tokens: int) -> int:
    """Sequences of `sequence_length` tokens the buffer holds at once without prefix sharing (dummy block aside)."""
    return (blocks - 1) // math.ceil(sequence_length / block_size_tokens)


class _NoDetokenizer:
    """megatron's engine detokenises only failed requests and stop words; we check limits first and stop on ids."""

    def detokenize(self, ids, **_):
        return ""


def _row_sampler(valid_vocab_size: int):
    """A megatron `Sampling` backend that samples each row from its own uniforms (module docstring)."""
    from megatron.core.inference.sampling.base import Sampling

    class RowSampler(Sampling):
        def __init__(self):
            self.call = None

        def start(self, first_request_id: int, uniforms: torch.Tensor, params: SamplingParams) -> None:
            rows, max_new = uniforms.shape
            device = uniforms.device
            self.call = dict(first_id=first_request_id, uniforms=uniforms, params=params,
                             stops=torch.tensor(params.stop_token_ids, dtype=torch.long, device=device),
                             tokens=torch.full((rows, max_new), -1, dtype=torch.long, device=device),
                             logprobs=torch.zeros((rows, max_new), dtype=torch.float32, device=device),
                             entropies=torch.zeros((rows, max_new), dtype=torch.float32, device=device),
                             steps=torch.zeros(rows, dtype=torch.long), last=([], None))

        def finish(self) -> dict:
            call, self.call = self.call, None
            return call

        def sample_kernel(self, logits, n, context, *, no_top_k, no_top_p, gather_indices=None,
                          token_to_request_index=None, output=None, eager=False, cache_key=None):
            call, params = self.call, self.call["params"]
            active = slice(context.paused_request_count, context.paused_request_count + n)
            request_ids = context.request_ids[active].long()
            rows = request_ids - call["first_id"]
            steps = call["steps"][rows]
            rows_d, steps_d = rows.to(logits.device), steps.to(logits.device)
            logits = logits[gather_indices[:n]] if gather_indices is not None else logits[:n]
            tokens, logprobs, entropies = sample_tokens(logits[:, :valid_vocab_size],
                                                        call["uniforms"][rows_d, steps_d], params.temperature,
                                                        params.top_p, params.top_k)
            call["tokens"][rows_d, steps_d] = tokens
            call["logprobs"][rows_d, steps_d] = logprobs
            call["entropies"][rows_d, steps_d] = entropies
            call["steps"][rows] += 1
            call["last"] = (request_ids.tolist(), tokens)
            if output is None:
                return tokens
            output.copy_(tokens)
            return output

        def log_probs_kernel(self, logits, context, *, token_to_request_index=None):
            params = self.call["params"]
            out = torch.full_like(logits, float("-inf"), dtype=torch.float32)
            out[:, :valid_vocab_size] = sampling_logprobs(logits[:, :valid_vocab_size], params.temperature,
                                                          params.top_p, params.top_k)
            return out

        def stopped_request_ids(self, active_request_ids) -> set[int]:
            """megatron's stop callback (after each step's sampling): the requests whose new token is a stop id."""
            request_ids, tokens = self.call["last"]
            if tokens is None or self.call["stops"].numel() == 0:
                return set()
            hits = torch.isin(tokens, self.call["stops"]).tolist()
            return {rid for rid, hit in zip(request_ids, hits) if hit} & set(active_request_ids)

    return RowSampler()


class MegatronEngine(RolloutEngine):
    """Sampling engine over a megatron-core `GPTModel` stage (see the module docstring).

    model:               this rank's `GPTModel` (or a DDP / Float16Module wrapper of it); shared, never copied.
    valid_vocab_size:    the real vocabulary (megatron pads it); padded ids are never sampled.
    eos_token_id:        a row stops after emitting it (or one of `SamplingParams.stop_token_ids`).
    max_requests:        rows decoded together (megatron's `max_requests`, rounded up to a multiple of TP).
    max_sequence_length: longest prompt + response; sizes the block table (rollout.max_sequence_length).
    block_size_tokens:   tokens per KV block (rollout.kv_block_size); prefix sharing works in whole blocks.
    kv_buffer_gb:        KV cache per GPU (rollout.kv_buffer_gb); None = room for `max_requests` sequences of
                         `max_sequence_length`. Smaller buffers make megatron pause and re-prefill rows.
    prefix_caching:      the G samples of a prompt share its full KV blocks (rollout.prefix_caching).
    cuda_graph:          megatron's "local" CUDA graphs for decode steps, switched on while generating; the
                         model must be built with them (`MegatronConfig.inference_cuda_graphs`; rollout.cuda_graph).
    release_kv_cache:    `suspend()` frees the KV cache (else it stays allocated between phases).
    mp_group:            the model-parallel group (TP x PP) whose ranks must sample identically.
    ep_group:            the expert-parallel group whose ranks step together (module docstring); None without
                         expert parallelism.
    """

    def __init__(self, model: torch.nn.Module, *, valid_vocab_size: int, eos_token_id: int, max_requests: int = 256,
                 max_sequence_length: int = 4096, block_size_tokens: int = 256, kv_buffer_gb: float | None = None,
                 prefix_caching: bool = True, cuda_graph: bool = False, release_kv_cache: bool = True,
                 mp_group: dist.ProcessGroup | None = None, ep_group: dist.ProcessGroup | None = None):
        while hasattr(model, "module"):
            model = model.module
        self.model = model
        config = model.config
        if max_requests < 1 or block_size_tokens < 1 or max_sequence_length < 2:
            raise ValueError(f"max_requests, block_size_tokens must be >= 1 and max_sequence_length >= 2; got "
                             f"{max_requests}, {block_size_tokens}, {max_sequence_length}")
        if cuda_graph and config.inference_cuda_graph_scope.name == "none":
            raise ValueError("rollout.cuda_graph with the megatron engine needs a model built with megatron's "
                             "local CUDA graphs (MegatronConfig.inference_cuda_graphs)")
        self.device = next(model.parameters()).device
        self.valid_vocab_size = int(valid_vocab_size)
        self.eos_token_id = int(eos_token_id)
        self.mp_group = mp_group
        self.ep_group = ep_group if ep_group is not None and dist.get_world_size(ep_group) > 1 else None
        self.moe = bool(config.num_moe_experts)
        tp = config.tensor_model_parallel_size
        self.max_requests = engine_max_requests(max_requests, tp)
        self.max_sequence_length = max_sequence_length
        self.block_size_tokens = block_size_tokens
        self.attention = select_inference_attention(self.device)
        self.block_bytes = kv_block_bytes(len(model.decoder.layers), kv_heads_per_rank(config.num_query_groups, tp),
                                          config.kv_channels, block_size_tokens, config.params_dtype.itemsize)
        if kv_buffer_gb is None:
            kv_buffer_gb = default_kv_buffer_gb(self.max_requests, max_sequence_length, block_size_tokens,
                                                self.block_bytes)
        self.kv_buffer_gb = kv_buffer_gb
        self.num_blocks = kv_buffer_blocks(kv_buffer_gb, self.block_bytes)  # what megatron's context allocates
        self.prefix_caching = prefix_caching
        self.cuda_graph = cuda_graph
        self.release_kv_cache = release_kv_cache
        self._sampler = _row_sampler(self.valid_vocab_size)
        # A mixture of experts' call: recorded experts by row and position, the call's first request id, the rows
        # seen so far (`_record_routing`).
        self._routed: torch.Tensor | None = None
        self._routed_first_id, self._routed_seen = 0, set()
        self._engine = None
        self._next_request_id = 0

    # ---- engine lifetime ----------------------------------------------------------------------------------------

    def _inference_config(self):
        from megatron.core.inference.config import InferenceConfig, KVCacheManagementMode

        return InferenceConfig(
            block_size_tokens=self.block_size_tokens, buffer_size_gb=self.kv_buffer_gb,
            max_requests=self.max_requests,
            max_tokens=engine_step_tokens(self.max_requests, self.max_sequence_length),
            max_sequence_length=self.max_sequence_length, num_cuda_graphs=4 if self.cuda_graph else None,
            use_cuda_graphs_for_non_decode_steps=False, materialize_only_last_token_logits=True,
            enable_prefix_caching=self.prefix_caching, use_flashinfer_fused_rope=False,
            kv_cache_management_mode=(KVCacheManagementMode.RECOMPUTE if self.release_kv_cache
                                       else KVCacheManagementMode.PERSIST))

    def _ready_engine(self):
        """The dynamic engine with its KV cache allocated: built on first use, resumed after `suspend`."""
        from megatron.core.inference.contexts.dynamic_context import DynamicInferenceContext
        from megatron.core.inference.engines.dynamic_engine import DynamicInferenceEngine
        from megatron.core.inference.model_inference_wrappers.gpt.gpt_inference_wrapper import GPTInferenceWrapper
        from megatron.core.inference.text_generation_controllers.text_generation_controller import (
            TextGenerationController)

        if self._engine is None:
            context = DynamicInferenceContext(self.model.config, self._inference_config())
            controller = TextGenerationController(GPTInferenceWrapper(self.model, context), _NoDetokenizer())
            set_sampling(controller, self._sampler)
            self._engine = DynamicInferenceEngine(controller, context)
            self._engine.controller.set_stop_word_finished_ids_callback(self._sampler.stopped_request_ids)
        else:
            self._engine.resume()
        return self._engine

    def _toggle_cuda_graphs(self, implementation: str) -> None:
        """megatron's CUDA-graph managers on ("local") while generating, off ("none") for training forwards."""
        if self.cuda_graph:
            from megatron.core.transformer.utils import toggle_cuda_graphs

            toggle_cuda_graphs(self.model, implementation)

    def suspend(self) -> None:
        """Release the KV cache and CUDA graphs until the next `generate` (no-op before the first)."""
        if self._engine is not None:
            self._engine.suspend()

    @property
    def kv_cache(self) -> torch.Tensor | None:
        """The allocated KV buffer, or None while suspended (what `suspend` returns to the allocator)."""
        context = None if self._engine is None else self._engine.context
        return getattr(context, "memory_buffer", None)

    def prefix_cache_stats(self) -> dict[str, int]:
        """Prompt tokens prefilled ("computed") and taken from shared KV blocks ("skipped") since the engine was
        built: megatron's own cumulative counters (what its step log prints)."""
        if self._engine is None:
            return {"computed": 0, "skipped": 0}
        return prefill_token_counts(self._engine)

    # ---- generation ---------------------------------------------------------------------------------------------

    def _check_limits(self, rows: list[list[int]], params: SamplingParams) -> None:
        longest = max(len(r) for r in rows)
        if longest + params.max_new_tokens > self.max_sequence_length:
            raise ConfigError(f"a prompt of {longest} tokens + max_new_tokens={params.max_new_tokens} exceeds the "
                              f"engine's max_sequence_length={self.max_sequence_length}; raise "
                              f"rollout.max_sequence_length (eval: --max-sequence-length)")
        needed = math.ceil((longest + params.max_new_tokens) / self.block_size_tokens)
        if needed > self.num_blocks - 1:
            raise ConfigError(f"one sequence of {longest + params.max_new_tokens} tokens needs {needed} KV blocks of "
                              f"{self.block_size_tokens} tokens but the KV buffer ({self.kv_buffer_gb:.3g} GB) holds "
                              f"{self.num_blocks - 1}; raise rollout.kv_buffer_gb (eval: --kv-buffer-gb) to at least "
                              f"{(needed + 1) * self.block_bytes / 2**30:.3g}")

    def _others_unfinished(self, unfinished: bool) -> bool:
        """Whether any rank of the expert-parallel group still has requests (collective; `unfinished` is this
        rank's)."""
        flag = torch.tensor([int(unfinished)], device=self.device if dist.get_backend(self.ep_group) == "nccl"
                            else "cpu")
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.ep_group)
        return bool(flag.item())

    def _steps(self, engine, first_id: int) -> dict[int, list[int]]:
        """Step megatron's engine until this rank's requests (and, under expert parallelism, every rank's of its
        group) are finished: row -> its generated tokens."""
        generated = {}
        while True:
            unfinished = engine.has_unfinished_requests()
            if self.ep_group is not None and self._others_unfinished(unfinished) and not unfinished:
                engine.controller.dummy_forward()  # its MoE layers' token exchange needs this rank
                continue
            if not unfinished:
                return generated
            for record in engine.step_modern()["finished_request_records"]:
                request = record.merge()
                generated[request.request_id - first_id] = list(request.generated_tokens)

    def _record_routing(self, flat) -> None:
        """File a step's recorded experts ([active tokens, layers, k]) by row and position (module docstring); a
        row first seen past position 0 starts after prefix-shared blocks, whose records megatron keeps."""
        context, routed = self._engine.context, self._routed
        n = context.active_token_count
        slots = context.token_to_request_idx[:n].long().cpu()
        rows = context.request_ids[slots].long().cpu() - self._routed_first_id
        positions = context.token_to_pos_ids[:n].long().cpu()
        routed[rows, positions] = torch.as_tensor(flat, dtype=torch.int16)
        block = context.block_size_tokens
        for row in rows.unique().tolist():
            if row in self._routed_seen:
                continue
            self._routed_seen.add(row)
            mine = rows == row
            shared = int(positions[mine].min()) // block  # whole blocks taken from the prefix cache
            blocks = context.request_to_kv_block_ids[int(slots[mine][0])][:shared].tolist()
            for j, block_id in enumerate(blocks):
                kept = context.kv_block_allocator.get_block_routing(int(block_id))
                if kept is not None:
                    routed[row, j * block:(j + 1) * block] = torch.as_tensor(kept, dtype=torch.int16)

    def generate(self, prompts: list[list[int]], n: int, params: SamplingParams) -> list[list[Completion]]:
        from megatron.core.inference.sampling_params import SamplingParams as MegatronSamplingParams
        from megatron.core.inference.utils import InferenceMode

        check_params(prompts, n, params)
        rows = [list(p) for p in prompts for _ in range(n)]  # prompt i's n samples are consecutive rows
        self._check_limits(rows, params)
        params = dataclasses.replace(params, stop_token_ids=(self.eos_token_id, *params.stop_token_ids))
        first_id, self._next_request_id = self._next_request_id, self._next_request_id + len(rows)
        was_training = self.model.training
        self.model.eval()
        self._toggle_cuda_graphs("local")
        try:
            with InferenceMode.active():
                engine = self._ready_engine()
                self._sampler.start(first_id, draw_uniforms(len(rows), params).to(self.device), params)
                # Termination is our stop callback's; megatron's own sampling settings are unused.
                request_params = MegatronSamplingParams(num_tokens_to_generate=params.max_new_tokens,
                                                        termination_id=-1)
                for r, prompt in enumerate(rows):
                    engine.add_request(first_id + r, prompt, request_params)
                if self.moe:
                    from megatron.core.transformer.moe.router import TopKRouter

                    layers = sum(isinstance(m, TopKRouter) for m in self.model.modules())  # this stage's
                    self._routed = torch.full((len(rows), max(map(len, rows)) + params.max_new_tokens, layers,
                                               self.model.config.moe_router_topk), NOT_RECORDED, dtype=torch.int16)
                    self._routed_first_id, self._routed_seen = first_id, set()
                    intercept_routing(engine.context, self._record_routing)
                generated = self._steps(engine, first_id)
                call = self._sampler.finish()
        finally:
            if self.moe:
                end_recording()
            self._toggle_cuda_graphs("none")
            self.model.train(was_training)
        completions = self._completions(call, generated, params)
        if self.moe:  # the prompt and the response but its last token
            for r, (row, c) in enumerate(zip(rows, completions)):
                c.routed_experts = self._routed[r, :len(row) + len(c.token_ids) - 1].clone()
            self._routed = None
        check_same_tokens(call["tokens"], self.mp_group)
        return [completions[i * n:(i + 1) * n] for i in range(len(prompts))]

    def _completions(self, call: dict, generated: dict[int, list[int]], params: SamplingParams) -> list[Completion]:
        tokens, logprobs, entropies = call["tokens"].cpu(), call["logprobs"].cpu(), call["entropies"].cpu()
        steps = call["steps"].tolist()
        stops = set(params.stop_token_ids)
        out = []
        for r, length in enumerate(steps):
            ids = tokens[r, :length].tolist()
            if generated.get(r) != ids:
                raise RuntimeError(f"row {r}: megatron's engine kept {generated.get(r)} but sampled {ids}")
            out.append(Completion(ids, logprobs[r, :length].tolist(), bool(ids) and ids[-1] in stops,
                                  entropies[r, :length].tolist()))
        return out
