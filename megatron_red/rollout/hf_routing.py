"""The routers of a Hugging Face mixture of experts (Qwen3-MoE, Qwen2-MoE): recording the experts the local engine
chooses, and replaying them in the Hugging Face policy's forwards (the Megatron backend's counterpart is
parallel/routing.py, whose module docstring says why: routing replay, R3).

Each MoE layer's router (`mlp.gate`, transformers' `Qwen3MoeTopKRouter` / `Qwen2MoeTopKRouter`) maps the layer's
hidden states, flattened to [tokens, hidden] batch-major, to (router logits, routing weights, chosen experts
[tokens, k]); the weights are the softmax probabilities of the chosen experts, renormalised over them when the
config's `norm_topk_prob`. A `RouterHooks` puts a forward hook on every router, in layer order:

- `record()`: the hooks keep each layer's chosen experts of the last forward (`last`), for the local engine to
  place at the positions it ran;
- `replay(targets)`: the hooks route each token with a recorded choice (targets [tokens, layers, k], -1 = none) to
  those experts, with the weights recomputed from the router's own logits, and count the recorded routings whose
  computed choice differs and the load-balancing loss of the computed routing per layer (parallel/routing.py's
  `mismatches` and `balance_loss`); `replay=False` only counts.
"""
from __future__ import annotations

import torch

from megatron_red.parallel.routing import balance_loss, mismatches, replayed


def moe_routers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The routers of a Hugging Face causal LM's MoE layers, in layer order ([] for a dense model)."""
    layers = model.get_decoder().layers if hasattr(model, "get_decoder") else model.layers
    return [layer.mlp.gate for layer in layers if hasattr(layer.mlp, "gate") and hasattr(layer.mlp, "experts")]


class RouterHooks:
    """Forward hooks on a model's MoE routers (module docstring); `remove()` takes them off."""

    def __init__(self, model: torch.nn.Module):
        self.routers = moe_routers(model)
        config = model.config
        self.topk = getattr(config, "num_experts_per_tok", 0)
        self.normalise = bool(getattr(config, "norm_topk_prob", False))
        self.mode = None  # None (pass through), "record" or "replay"
        self.last: list[torch.Tensor | None] = [None] * len(self.routers)
        self.targets: torch.Tensor | None = None
        self.replaying = True
        self._counted: set[int] = set()
        self._counts: list[torch.Tensor] = []  # per counted forward of a layer, on its device (`statistics`)
        self._handles = [router.register_forward_hook(self._hook(i)) for i, router in enumerate(self.routers)]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    def record(self) -> None:
        self.mode = "record"

    def replay(self, targets: torch.Tensor | None, replay: bool = True, count: bool = True) -> None:
        """The next forward's recorded experts [tokens, layers, k] (batch-major), or None; with `count`, counted
        once per layer until the next call (a checkpointed layer's recomputation replays without counting again)."""
        self.mode, self.targets, self.replaying = "replay", targets, replay
        self._counted = set() if count else set(range(len(self.routers)))

    def off(self) -> None:
        self.mode, self.targets = None, None

    def statistics(self) -> dict[str, float]:
        """The counts since the last call (as parallel/routing.py's), then reset."""
        mismatched, recorded, aux, terms = (torch.stack(self._counts).sum(0).tolist() if self._counts
                                            else (0.0, 0.0, 0.0, 0.0))
        self._counts = []
        return {"moe_routing_mismatched": mismatched, "moe_routings_recorded": recorded, "moe_aux_loss_sum": aux,
                "moe_aux_loss_terms": terms}

    def _hook(self, layer: int):
        def hook(module, inputs, output):
            logits, weights, chosen = output
            if self.mode == "record":
                self.last[layer] = chosen
            if self.mode != "replay":
                return None
            targets = None if self.targets is None else self.targets[:, layer].to(chosen.device)
            if layer not in self._counted:
                self._counted.add(layer)
                self._count(logits, chosen, targets)
            if targets is None or not self.replaying:
                return None
            chosen = replayed(chosen, targets)
            weights = torch.softmax(logits, dim=-1, dtype=torch.float).gather(1, chosen)
            if self.normalise:
                weights = weights / weights.sum(dim=-1, keepdim=True)
            return logits, weights.to(logits.dtype), chosen
        return hook

    def _count(self, logits: torch.Tensor, chosen: torch.Tensor, targets: torch.Tensor | None) -> None:
        """(mismatched, recorded, load-balancing loss, 1) of this layer's forward, kept on the device."""
        with torch.no_grad():
            counts = mismatches(chosen, targets) if targets is not None else logits.new_zeros(2, dtype=torch.float64)
            probs = torch.softmax(logits.float(), dim=-1)
            choices = torch.zeros_like(probs).scatter_(1, chosen, 1.0)
            aux = balance_loss(probs.sum(0), choices.sum(0), probs.new_tensor([probs.shape[0]]), self.topk)
            self._counts.append(torch.cat([counts, aux.double().reshape(1), counts.new_ones(1)]))
