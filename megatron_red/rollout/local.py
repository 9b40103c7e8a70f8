"""The local rollout engine: batched, KV-cached sampling from a Hugging Face Qwen2 / Llama / Qwen3 module in torch.

It runs the HF module's own sub-modules (embeddings, rotary table, projections, MLPs, norms, head) through its
own decode loop rather than `model.generate`, so that it can keep a pre-allocated ("static") KV cache, keep every
per-token decision on the device, and replay each decode step as one CUDA graph:

- prompts are left-padded and prefilled once; then one token per step for every running row;
- the cache holds `prompt_len + max_new_tokens` slots; step t writes slot `P + t` and attends to the filled,
  non-padding slots (a per-row validity mask). Eager decoding reads only the slots written so far; a captured
  graph reads the whole cache, so that the step's shapes never change;
- sampling is inverse-CDF with uniforms drawn up front from a `torch.Generator` seeded with `params.seed`
  (on the CPU, so the same seed gives the same draws on any device); a row that emitted EOS emits pad after;
- the host checks which rows finished only every `sync_every` steps (nothing else leaves the device per token);
  in eager decoding the finished rows then leave the batch, so a chunk's long tail decodes only its long rows.

The rotary table is the module's own, so Llama-3 RoPE scaling comes with it; Qwen3's per-head q/k norms are
applied before RoPE, as in its attention.

Behaviour log-probs: the log-probability of each sampled token under the distribution it was drawn from
(`rollout.sampling.sampling_logprobs`: temperature, then top-k and the top-p nucleus, renormalised). Tokens after
EOS get log-prob 0 and are not returned.

Mixtures of experts: hooks on the routers (rollout/hf_routing.py) record the experts each MoE layer chose at every
position the engine ran (the prompt in the prefill, then each fed-back token), and a completion carries them
(`Completion.routed_experts`) for the trainer to replay. Captured decode steps (CUDA graphs) would fix the
positions the hooks write to, so a mixture of experts decodes eagerly.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from megatron_red.batch import NOT_RECORDED
from megatron_red.rollout.base import Completion, RolloutEngine, SamplingParams
from megatron_red.rollout.hf_routing import RouterHooks
from megatron_red.rollout.sampling import check_params, draw_uniforms, sample_tokens


class LocalEngine(RolloutEngine):
    """Sampling engine for an HF causal LM.

    model:          the HF module (e.g. `HFPolicy.model`) of a supported family (`trainer.build.build_engine` checks
                    it with `models.architectures.check_supported`).
    eos_token_id:   a row stops after emitting it (or one of `SamplingParams.stop_token_ids`).
    pad_token_id:   emitted by finished rows (never returned).
    max_batch_size: rows (prompts x n) decoded together; bounds KV-cache memory.
    device, dtype:  where and in which precision to decode (defaults: the model's device; bf16 on CUDA, the model's
                    dtype on CPU). When they match the model's, the engine samples from the very same module (and
                    `sync_weights` is a no-op); otherwise it keeps its own copy, refreshed by `sync_weights`.
    cuda_graph:     capture the decode step as a CUDA graph and replay it (CUDA only): removes the per-kernel
                    launch cost that dominates small-batch decoding. One graph is kept per (rows, cache length).
    sync_every:     decode steps between host checks of "every row finished".
    """

    def __init__(self, model: torch.nn.Module, eos_token_id: int, pad_token_id: int, max_batch_size: int = 64,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                 cuda_graph: bool = False, sync_every: int = 16):
        config = model.config
        if max_batch_size < 1 or sync_every < 1:
            raise ValueError(f"max_batch_size and sync_every must be >= 1, got {max_batch_size}, {sync_every}")
        source_param = next(model.parameters())
        self.device = torch.device(device) if device is not None else source_param.device
        self.dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else source_param.dtype)
        if cuda_graph and self.device.type != "cuda":
            raise ValueError("cuda_graph=True needs a CUDA device")
        if source_param.device == self.device and source_param.dtype == self.dtype:
            self.model = model
        else:
            self.model = copy.deepcopy(model).to(device=self.device, dtype=self.dtype)
            self.model.requires_grad_(False)
        self.eos_token_id = int(eos_token_id)
        self.pad_token_id = int(pad_token_id)
        self.max_batch_size = max_batch_size
        self.cuda_graph = cuda_graph
        self.sync_every = sync_every
        self._num_kv_heads = config.num_key_value_heads
        self._head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self._qk_norm = hasattr(model.get_decoder().layers[0].self_attn, "q_norm")  # Qwen3 / Qwen3-MoE
        self._state: _DecodeState | None = None
        self._routers = RouterHooks(self.model)
        if cuda_graph and self._routers.routers:
            raise ValueError("rollout.cuda_graph: a mixture of experts decodes eagerly on the local engine (its "
                             "routers' records would be captured at fixed positions)")

    def sync_weights(self, policy) -> None:
        """Copy `policy`'s weights (an `HFPolicy` or an HF module) into the engine; a no-op when the engine
        samples from that very module."""
        source = policy if isinstance(policy, torch.nn.Module) else policy.model
        if source is self.model:
            return
        target = self.model.state_dict()
        with torch.no_grad():
            for name, tensor in source.state_dict().items():
                if name not in target:
                    raise ValueError(f"policy weight {name!r} has no counterpart in the engine's model")
                target[name].copy_(tensor)

    # ---- public -------------------------------------------------------------------------------------------

    def generate(self, prompts: list[list[int]], n: int, params: SamplingParams) -> list[list[Completion]]:
        check_params(prompts, n, params)
        rows = [list(p) for p in prompts for _ in range(n)]  # prompt i's n samples are consecutive rows
        uniforms = draw_uniforms(len(rows), params)
        completions: list[Completion] = []
        was_training = self.model.training
        self.model.eval()
        if self._routers.routers:
            self._routers.record()
        try:
            with torch.no_grad():
                for start in range(0, len(rows), self.max_batch_size):
                    chunk = rows[start:start + self.max_batch_size]
                    completions += self._generate_chunk(chunk, uniforms[start:start + len(chunk)], params)
        finally:
            self._routers.off()
            self.model.train(was_training)
        return [completions[i * n:(i + 1) * n] for i in range(len(prompts))]

    # ---- decoding -----------------------------------------------------------------------------------------

    def _generate_chunk(self, rows: list[list[int]], uniforms: torch.Tensor,
                        params: SamplingParams) -> list[Completion]:
        b, max_new = len(rows), params.max_new_tokens
        prompt_len = max(len(r) for r in rows)
        tokens = torch.full((b, prompt_len), self.pad_token_id, dtype=torch.long)
        valid = torch.zeros((b, prompt_len), dtype=torch.bool)
        for i, r in enumerate(rows):
            tokens[i, prompt_len - len(r):] = torch.tensor(r, dtype=torch.long)
            valid[i, prompt_len - len(r):] = True
        tokens, valid = tokens.to(self.device), valid.to(self.device)
        uniforms = uniforms.to(self.device)
        state = self._decode_state(b, prompt_len + max_new)
        state.reset(valid, prompt_len)

        # Prefill: all prompt positions at once; pad queries attend to themselves only (keeps softmax finite).
        positions = (valid.long().cumsum(-1) - 1).clamp_(min=0)
        causal = torch.ones(prompt_len, prompt_len, dtype=torch.bool, device=self.device).tril_()
        eye = torch.eye(prompt_len, dtype=torch.bool, device=self.device)
        prefill_mask = ((causal & valid[:, None, :]) | eye)[:, None]
        slots = torch.arange(prompt_len, device=self.device)
        logits = self._forward(tokens, positions, slots, prefill_mask, state, kv_len=prompt_len)
        lengths = valid.sum(-1)  # each row's prompt length: its position of the first fed-back token
        routed = self._record_prefill(valid, prompt_len + max_new) if self._routers.routers else None

        out_tokens = torch.full((b, max_new), self.pad_token_id, dtype=torch.long, device=self.device)
        out_logprobs = torch.zeros((b, max_new), dtype=torch.float32, device=self.device)
        out_entropies = torch.zeros((b, max_new), dtype=torch.float32, device=self.device)
        finished = torch.zeros(b, dtype=torch.bool, device=self.device)
        stops = torch.tensor((self.eos_token_id, *params.stop_token_ids), device=self.device)
        rows_now = torch.arange(b, device=self.device)  # the chunk rows the state still decodes
        for t in range(max_new):
            if t > 0:
                state.tokens.copy_(out_tokens[rows_now, t - 1:t])
                logits = self._captured_step(state) if self.cuda_graph else self._decode_step(state, prompt_len + t)
                state.advance()
                if routed is not None:  # the token sampled at t - 1 ran at position prompt length + t - 1
                    routed[rows_now, lengths[rows_now] + t - 1] = self._recorded()
            token, logprob, entropy = sample_tokens(logits, uniforms[rows_now, t], params.temperature,
                                                    params.top_p, params.top_k)
            done = finished[rows_now]
            out_tokens[rows_now, t] = token.masked_fill(done, self.pad_token_id)
            out_logprobs[rows_now, t] = logprob.masked_fill(done, 0.0)
            out_entropies[rows_now, t] = entropy.masked_fill(done, 0.0)
            finished[rows_now] = done | torch.isin(token, stops)
            if (t + 1) % self.sync_every == 0:
                running = (~finished[rows_now]).nonzero().squeeze(-1)
                if running.numel() == 0:
                    break
                if not self.cuda_graph and running.numel() < rows_now.numel():
                    state.keep_rows(running)  # finished rows leave the batch (eager only: a graph's shapes are fixed)
                    rows_now = rows_now[running]
        completions = self._completions(out_tokens.cpu(), out_logprobs.cpu(), out_entropies.cpu(), stops.cpu())
        if routed is not None:  # the prompt and the response but its last token
            routed = routed.cpu()
            for i, c in enumerate(completions):
                c.routed_experts = routed[i, :int(lengths[i]) + len(c.token_ids) - 1].clone()
        return completions

    def _recorded(self) -> torch.Tensor:
        """The routers' choices of the last forward, [tokens, layers, k] int16."""
        return torch.stack(self._routers.last, dim=1).to(torch.int16)

    def _record_prefill(self, valid: torch.Tensor, width: int) -> torch.Tensor:
        """[rows, width, layers, k] recorded experts by position (-1 = none), holding the prefill's: row i's prompt
        is left-padded, so its position p was column p + (prompt_len - its length)."""
        b, prompt_len = valid.shape
        recorded = self._recorded()
        recorded = recorded.view(b, prompt_len, *recorded.shape[1:])
        routed = torch.full((b, width, *recorded.shape[2:]), NOT_RECORDED, dtype=torch.int16, device=self.device)
        row, column = valid.nonzero(as_tuple=True)
        routed[row, column - (prompt_len - valid.sum(-1))[row]] = recorded[row, column]
        return routed

    def _completions(self, tokens: torch.Tensor, logprobs: torch.Tensor, entropies: torch.Tensor,
                     stops: torch.Tensor) -> list[Completion]:
        out = []
        is_stop = torch.isin(tokens, stops)
        for i in range(tokens.shape[0]):
            hits = is_stop[i].nonzero()
            finished = hits.numel() > 0
            length = int(hits[0]) + 1 if finished else tokens.shape[1]
            out.append(Completion(tokens[i, :length].tolist(), logprobs[i, :length].tolist(), finished,
                                  entropies[i, :length].tolist()))
        return out

    def _decode_state(self, rows: int, cache_len: int) -> "_DecodeState":
        if self._state is None or self._state.shape != (rows, cache_len):
            self._state = None  # free the old cache (and its graph) before allocating the new one
            num_layers = len(self.model.get_decoder().layers)
            self._state = _DecodeState(rows, cache_len, num_layers, self._num_kv_heads, self._head_dim,
                                       self.model.config.vocab_size, self.dtype, self.device)
        return self._state

    def _decode_step(self, state: "_DecodeState", kv_len: int) -> torch.Tensor:
        """One token per row at cache slot `state.slot`, attending to the first `kv_len` cache slots (those up to
        the slot; a captured graph passes the whole cache); reads and writes only `state`'s buffers."""
        mask = (state.key_valid[:, :kv_len] & (state.slot_range[:kv_len] <= state.slot))[:, None, None, :]
        state.logits.copy_(self._forward(state.tokens, state.positions, state.slot, mask, state, kv_len=kv_len))
        return state.logits

    def _captured_step(self, state: "_DecodeState") -> torch.Tensor:
        """Replay (capturing first) the decode step as a CUDA graph over the whole cache."""
        if state.graph is None:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                self._decode_step(state, state.shape[1])  # warm-up outside the graph (lazy allocations, kernels)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._decode_step(state, state.shape[1])
            state.graph = graph  # the warm-up wrote cache slot P, which the first real step overwrites
        state.graph.replay()
        return state.logits

    def _forward(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, mask: torch.Tensor,
                 state: "_DecodeState", kv_len: int) -> torch.Tensor:
        """fp32 next-token logits [b, V] after the last of `tokens` [b, T]; writes K/V into cache `slots`."""
        decoder = self.model.get_decoder()
        b, length = tokens.shape
        hidden = decoder.embed_tokens(tokens)
        cos, sin = decoder.rotary_emb(hidden, positions)
        cos, sin = cos[:, None], sin[:, None]
        for i, layer in enumerate(decoder.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(hidden)
            q = attn.q_proj(x).view(b, length, -1, self._head_dim)
            k = attn.k_proj(x).view(b, length, -1, self._head_dim)
            if self._qk_norm:
                q, k = attn.q_norm(q), attn.k_norm(k)
            q, k = q.transpose(1, 2), k.transpose(1, 2)
            v = attn.v_proj(x).view(b, length, -1, self._head_dim).transpose(1, 2)
            q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
            state.keys[i].index_copy_(2, slots, k)
            state.values[i].index_copy_(2, slots, v)
            keys, values = state.keys[i][:, :, :kv_len], state.values[i][:, :, :kv_len]
            o = _attention(q, keys, values, mask, attn.scaling)
            hidden = hidden + attn.o_proj(o.transpose(1, 2).reshape(b, length, -1))
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        last = decoder.norm(hidden[:, -1])
        return self.model.get_output_embeddings()(last).float()


class _DecodeState:
    """Fixed device buffers of one decode shape: KV cache, the step's inputs and its logits (graph-safe)."""

    def __init__(self, rows, cache_len, num_layers, num_kv_heads, head_dim, vocab_size, dtype, device):
        self.shape = (rows, cache_len)
        cache = (rows, num_kv_heads, cache_len, head_dim)
        self.keys = [torch.zeros(cache, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(cache, dtype=dtype, device=device) for _ in range(num_layers)]
        self.tokens = torch.zeros((rows, 1), dtype=torch.long, device=device)
        self.positions = torch.zeros((rows, 1), dtype=torch.long, device=device)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)
        self.slot_range = torch.arange(cache_len, device=device)
        self.key_valid = torch.ones((rows, cache_len), dtype=torch.bool, device=device)
        self.logits = torch.zeros((rows, vocab_size), dtype=torch.float32, device=device)
        self.graph = None

    def reset(self, prompt_valid: torch.Tensor, prompt_len: int) -> None:
        """Start a chunk: slots past the prompt are valid once written; the first decode step writes slot P."""
        self.key_valid.fill_(True)
        self.key_valid[:, :prompt_len].copy_(prompt_valid)
        self.positions.copy_(prompt_valid.sum(-1, keepdim=True))
        self.slot.fill_(prompt_len)

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Drop every row but `rows` (indices into the current rows); a captured graph no longer applies."""
        self.keys = [k.index_select(0, rows) for k in self.keys]
        self.values = [v.index_select(0, rows) for v in self.values]
        self.tokens, self.positions = self.tokens.index_select(0, rows), self.positions.index_select(0, rows)
        self.key_valid, self.logits = self.key_valid.index_select(0, rows), self.logits.index_select(0, rows)
        self.shape = (rows.numel(), self.shape[1])
        self.graph = None

    def advance(self) -> None:
        self.positions.add_(1)
        self.slot.add_(1)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding in the HF (half-split) layout."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """Grouped-query attention; q [b, H, T, d], k/v [b, Hkv, S, d], boolean mask [b, 1, T, S] (True = attend)."""
    b, heads, length, dim = q.shape
    group = heads // k.shape[1]
    if length == 1:
        # Decode: the `group` query heads sharing a KV head become that head's query rows (no KV copy).
        o = F.scaled_dot_product_attention(q.reshape(b, k.shape[1], group, dim), k, v, attn_mask=mask, scale=scale)
        return o.reshape(b, heads, 1, dim)
    if group > 1:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
