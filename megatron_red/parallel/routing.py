"""Routing replay for mixture-of-experts layers on megatron-core's routers, and what the training forwards measure
about routing (`moe/routing_mismatch`, `moe/aux_loss`).

A token's expert choice is a top-k over router logits, so rounding differences between the rollout engine's forward
and the trainer's (batch shapes, kernels, precision) flip a choice now and then, and a flipped token's log-prob under
pi_old is then not the behaviour policy's. Routing replay (R3, "rollout routing replay") removes that: the engine
records, for every position it ran, each MoE layer's top-k experts, and the trainer's forwards of those positions
(pi_old and pi) route them to the same experts, recomputing only the routing weights (the softmax over the router's
own logits at the recorded experts). Positions the engine did not run are routed by the trainer: offline traces
(never generated), padding, and a row's last token (the engine samples it and stops).

megatron-core 0.19 has the hook: every `TopKRouter` passes its top-k through `router.router_replay`
(`transformer/moe/router_replay.py`), a `RouterReplay` whose `get_replay_topk` the dynamic inference engine switches
to recording (through megatron's list of them). `install` puts a `RoutingReplay` on each router of a model stage,
which holds such a recorder for the engine; while a `RoutingSession` is active (a training or log-prob pass,
`parallel/pipeline.py`), it takes that micro-batch's recorded experts instead of the computed ones (`replay`), and
counts (`measure`) the recorded routings whose computed top-k differs (`mismatches`) and the load-balancing loss of
the computed routing (`balance_loss`). Outside a session the engine's recording is megatron's own.

Recorded experts travel as a [tokens, layers of this stage, k] int16 tensor in the model's token order
(`parallel/packing.py`), -1 where nothing was recorded. With sequence parallelism each tensor-parallel rank routes
its contiguous share of those tokens. With full activation recompute the first forward runs without gradients and
the backward recomputes every layer in the order of the forwards (1F1B), so each recomputation replays the oldest
micro-batch not yet recomputed.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from megatron_red.batch import NOT_RECORDED
from megatron_red.megatron_internals import router_replay_class


def mismatches(chosen: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[recorded routings whose computed top-k `chosen` [tokens, k] is another set of experts, recorded routings]
    against the records `targets` [tokens, k] (NOT_RECORDED rows are not counted), float64 on `chosen`'s device (read
    once per pass, not per layer)."""
    targets = targets.to(chosen.device)
    rows = (targets != NOT_RECORDED).all(dim=-1)
    differs = (chosen.sort(dim=-1).values != targets.long().sort(dim=-1).values).any(dim=-1)
    return torch.stack([(differs & rows).sum(), rows.sum()]).double()


def replayed(chosen: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """`chosen` [tokens, k] with every recorded row of `targets` [tokens, k] (no NOT_RECORDED entry) in its place."""
    targets = targets.to(device=chosen.device, dtype=chosen.dtype)
    return torch.where((targets != NOT_RECORDED).all(dim=-1, keepdim=True), targets, chosen)


def balance_loss(prob_sums: torch.Tensor, choices: torch.Tensor, tokens: torch.Tensor, topk: int) -> torch.Tensor:
    """Switch Transformer's load-balancing loss E * sum_i f_i P_i of each (micro-batch, layer) routing: f_i, the
    share of the tokens' k choices that go to expert i (`choices` [.., E] counts them), and P_i, expert i's mean
    router probability (`prob_sums` [.., E] sums it over the `tokens` [.., 1]); 1 when perfectly balanced. What
    megatron's `moe_aux_loss_coeff` weighs (its `switch_load_balancing_loss_func`)."""
    return prob_sums.shape[-1] * ((choices / (tokens * topk)) * (prob_sums / tokens)).sum(dim=-1)


class RoutingReplay:
    """The replay hook of one MoE layer's router, called as megatron's `RouterReplay` (`get_replay_topk`); `index`
    is the layer's place among this stage's MoE layers (the order of the engine's records), `recorder` the
    `RouterReplay` megatron's engine records through."""

    def __init__(self, index: int, recorder):
        self.index = index
        self.recorder = recorder
        self.layer_number: int | None = None  # set by the router
        self.session: RoutingSession | None = None

    def get_replay_topk(self, scores, topk, num_groups=None, group_topk=None, default_compute_topk=None):
        if self.session is None or self.recorder.router_replay_action is not None:  # megatron's (the engine records)
            return self.recorder.get_replay_topk(scores, topk, num_groups, group_topk, default_compute_topk)
        return self.session.route(self.index, scores, topk, num_groups, group_topk, default_compute_topk)


def install(model: torch.nn.Module) -> list[RoutingReplay]:
    """A `RoutingReplay` on every router of this model stage, in layer order (also megatron's list of recorders,
    which its inference engine records through: `config.moe_enable_routing_replay` on). Returns them; [] for a
    dense model."""
    from megatron.core.transformer.moe.router import TopKRouter

    routers = [m for m in model.modules() if isinstance(m, TopKRouter)]
    if not routers:
        return []
    recorder = router_replay_class()
    recorder.clear_global_router_replay_instances()  # one model per process
    replays = []
    for index, router in enumerate(routers):
        replays.append(RoutingReplay(index, recorder()))  # a recorder joins megatron's list when made
        replays[-1].layer_number = replays[-1].recorder.layer_number = router.layer_number
        router.router_replay = replays[-1]
    routers[0].config.moe_enable_routing_replay = True  # the engine records into them
    return replays


def end_recording() -> None:
    """After the engine's steps: no router records any more (megatron leaves them recording), and their last
    records are dropped."""
    recorder = router_replay_class()
    recorder.clear_global_router_replay_action()
    recorder.clear_global_indices()


@dataclass
class RoutingSession:
    """One pass of micro-batches through a model stage's routers (`RoutingReplay`s).

    replay:      route recorded positions to their recorded experts.
    measure:     count mismatches and the load-balancing loss (training passes).
    recompute:   full activation recompute: the backward re-runs every router (see the module docstring).
    pre_softmax: the router's scores are probabilities (megatron's `moe_router_pre_softmax`), else logits.
    tp_group / sequence_parallel: each TP rank routes its share of the tokens with sequence parallelism.
    """

    replays: list[RoutingReplay]
    replay: bool
    measure: bool
    recompute: bool = False
    pre_softmax: bool = False
    tp_group: dist.ProcessGroup | None = None
    sequence_parallel: bool = False
    targets: torch.Tensor | None = None
    _pending: dict[int, collections.deque] = field(default_factory=lambda: collections.defaultdict(
        collections.deque))
    _counts: list[torch.Tensor] = field(default_factory=list)
    _balance: list[torch.Tensor] = field(default_factory=list)

    def __enter__(self) -> "RoutingSession":
        for replay in self.replays:
            replay.session = self
        return self

    def __exit__(self, *exc) -> None:
        for replay in self.replays:
            replay.session = None

    def set_micro_batch(self, targets: torch.Tensor | None) -> None:
        """The recorded experts [tokens, layers, k] of the micro-batch whose forward comes next (None: nothing
        recorded)."""
        self.targets = targets

    def _local(self, layer: int, tokens: int) -> torch.Tensor | None:
        """This rank's recorded experts [tokens, k] of `layer` in the current micro-batch."""
        if self.targets is None:
            return None
        targets = self.targets[:, layer]
        if self.sequence_parallel and self.tp_group is not None:
            rank = dist.get_rank(self.tp_group)
            targets = targets[rank * tokens:(rank + 1) * tokens]
        if targets.shape[0] != tokens:
            raise RuntimeError(f"{targets.shape[0]} recorded routings for {tokens} routed tokens")
        return targets

    def route(self, layer: int, scores: torch.Tensor, topk: int, num_groups, group_topk, compute_topk):
        """megatron's top-k step: (values of `scores` at the chosen experts, the chosen experts [tokens, k])."""
        probs, chosen = compute_topk(scores, topk, num_groups, group_topk)
        if self.recompute and torch.is_grad_enabled():  # the backward's recomputation of an earlier forward
            targets = self._pending[layer].popleft()
        else:
            targets = self._local(layer, chosen.shape[0])
            if self.recompute:
                self._pending[layer].append(targets)
            if self.measure:
                self._record(scores, chosen, targets)
        if not self.replay or targets is None:
            return probs, chosen
        chosen = replayed(chosen, targets)
        return scores.gather(1, chosen), chosen

    def _record(self, scores: torch.Tensor, chosen: torch.Tensor, targets: torch.Tensor | None) -> None:
        """Keep this (micro-batch, layer)'s counts on the device (`statistics` reads them all at once)."""
        with torch.no_grad():
            if targets is not None:
                self._counts.append(mismatches(chosen, targets))
            probs = scores.float() if self.pre_softmax else torch.softmax(scores.float(), dim=-1)
            choices = torch.zeros_like(probs).scatter_(1, chosen, 1.0)
            # per expert: summed probability, tokens choosing it; and the tokens
            self._balance.append(torch.cat([probs.sum(0), choices.sum(0), probs.new_tensor([probs.shape[0]])]))

    def statistics(self, topk: int) -> dict[str, float]:
        """This pass's counts on this stage, summed over the TP ranks that routed different tokens: recorded and
        mismatched routings, and the summed load-balancing loss of its (micro-batch, layer) pairs with their
        number. Collective over the TP group with sequence parallelism."""
        counts = torch.stack(self._counts).sum(0).float().cpu() if self._counts else torch.zeros(2)
        balance = torch.stack(self._balance).cpu() if self._balance else torch.zeros(0, 1)
        if self.sequence_parallel and self.tp_group is not None and dist.get_world_size(self.tp_group) > 1:
            both = torch.cat([counts, balance.reshape(-1)])
            device = "cuda" if dist.get_backend(self.tp_group) == "nccl" else "cpu"
            both = both.to(device)
            dist.all_reduce(both, group=self.tp_group)
            both = both.cpu()
            counts, balance = both[:2], both[2:].reshape(balance.shape)
        aux = 0.0
        if balance.numel():
            experts = (balance.shape[1] - 1) // 2
            prob_sums, choices, tokens = balance[:, :experts], balance[:, experts:2 * experts], balance[:, -1:]
            aux = float(balance_loss(prob_sums, choices, tokens, topk).sum())
        return {"moe_routing_mismatched": float(counts[0]), "moe_routings_recorded": float(counts[1]),
                "moe_aux_loss_sum": aux, "moe_aux_loss_terms": float(balance.shape[0])}
