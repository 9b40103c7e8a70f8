"""`SequenceBatch`: the rows one RED step trains on, as every layer passes them (trainer -> policy -> pipeline).

Sequences are prompt + response (or prompt + offline trace), right-padded; every per-token tensor is aligned with the
*targets* `input_ids[:, 1:]`, so it has shape `[B, L - 1]`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

NOT_RECORDED = -1
"""In the `routed_experts` field (a mixture of experts' recorded routing, [B, L-1, layers, k]: the experts each MoE
layer chose for input position t of the row, at index t): a position the rollout engine did not run."""


@dataclass
class SequenceBatch:
    """Right-padded token sequences plus the per-row / per-token inputs of the loss.

    input_ids:      [B, L] long, prompt followed by response or trace tokens, right-padded.
    attention_mask: [B, L] 1 on real tokens.
    loss_mask:      [B, L-1] 1 where the target `input_ids[:, t+1]` is a response / trace token.
    fields:         loss inputs, each with leading dimension B (e.g. old_logprobs [B, L-1], advantages [B],
                    is_offline [B], group_accuracy [B], routed_experts [B, L-1, layers, k]); sliced together with the
                    sequences.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor
    fields: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self):
        b, l = self.input_ids.shape
        if self.attention_mask.shape != (b, l):
            raise ValueError(f"attention_mask {tuple(self.attention_mask.shape)} != input_ids {(b, l)}")
        if self.loss_mask.shape != (b, l - 1):
            raise ValueError(f"loss_mask {tuple(self.loss_mask.shape)} must be [B, L-1] = {(b, l - 1)}")
        for name, value in self.fields.items():
            if value.shape[0] != b:
                raise ValueError(f"field {name!r} has leading dim {value.shape[0]}, expected B={b}")

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, rows: slice | torch.Tensor) -> "SequenceBatch":
        """Rows `rows` of every tensor (a slice or an index tensor)."""
        return SequenceBatch(
            self.input_ids[rows], self.attention_mask[rows], self.loss_mask[rows],
            {k: v[rows] for k, v in self.fields.items()},
        )

    def micro_batch_rows(self, micro_batch_size: int) -> list[torch.Tensor]:
        """Row indices of micro-batches of at most `micro_batch_size` rows, longest rows first (ties in row order).
        A micro-batch is padded to its longest row (`trimmed`), and a step's rows mix lengths (short answers,
        teacher traces, rollouts cut at the generation limit): grouping rows of similar length pads the least.
        Losses are normalised with the step's global counts, so the grouping does not change the update."""
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        lengths = self.attention_mask.sum(dim=1)
        order = torch.sort(lengths, descending=True, stable=True).indices
        return list(order.split(micro_batch_size))

    def trimmed(self) -> "SequenceBatch":
        """Drop trailing columns that are padding in every row (saves compute on short micro-batches)."""
        length = int(self.attention_mask.sum(dim=1).max().item()) if len(self) else 0
        length = max(length, 2)
        if length >= self.input_ids.shape[1]:
            return self
        fields = {
            k: (v[:, : length - 1] if v.dim() >= 2 and v.shape[1] == self.input_ids.shape[1] - 1 else v)
            for k, v in self.fields.items()
        }
        return SequenceBatch(self.input_ids[:, :length], self.attention_mask[:, :length],
                             self.loss_mask[:, : length - 1], fields)

    def idle_row(self) -> "SequenceBatch":
        """One row of two padding tokens with no loss token and this batch's fields (zero; no recorded routing):
        what a rank runs while another rank of its expert-parallel group (which exchanges tokens with it in every
        MoE layer) has a micro-batch more."""
        fields = {}
        for name, value in self.fields.items():
            shape = [1, *value.shape[1:]]
            if value.dim() >= 2 and value.shape[1] == self.input_ids.shape[1] - 1:
                shape[1] = 1
            fields[name] = value.new_full(shape, NOT_RECORDED if name == "routed_experts" else 0)
        ids = torch.zeros((1, 2), dtype=self.input_ids.dtype)
        return SequenceBatch(ids, torch.ones_like(ids), torch.zeros((1, 1), dtype=self.loss_mask.dtype), fields)

    def to(self, device: torch.device | str) -> "SequenceBatch":
        return SequenceBatch(self.input_ids.to(device), self.attention_mask.to(device), self.loss_mask.to(device),
                             {k: v.to(device) for k, v in self.fields.items()})


def masked_row_mean(values: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor) -> float:
    """Mean over the selected rows of each row's token mean (the authors' per-sample entropy, then over samples).
    NaN when no selected row has a token."""
    mask = mask.to(values.dtype)
    counts = mask.sum(dim=1)
    keep = rows & (counts > 0)
    if not bool(keep.any()):
        return float("nan")
    per_row = (values * mask).sum(dim=1)[keep] / counts[keep]
    return float(per_row.mean())
