"""Dynamic sampling over data-parallel replicas (two gloo processes): `RedTrainer.keep_groups_with_signal` gathers
(replica, index, has signal) triples each round and moves only the groups a replica must hand over, and its
decisions equal those of the implementation it replaced (main at 2c12d6d, copied below), which gathered every
replica's whole groups every round: the same groups are trained, as many on each replica, after the same extra
rounds, and each group's position (which cuts the step into mini-batches) is its place in that implementation's
order of the step's groups, the order one replica trains them in. The trainer is a stand-in holding what the method reads (config, replicas, prompt stream, `roll_out`),
because the decision does not depend on a model: groups are toy prompts whose rewards follow a pattern.
"""
from __future__ import annotations

from types import SimpleNamespace

from dist_utils import run_distributed

# Which prompts' groups have reward variance, as a function of the prompt number p (prompts 0, 1, 2, ... in stream
# order, 4 per batch): none of the second replica's (it must receive groups), every other one, rare ones (the
# rounds run out), all.
PATTERNS = {"first_half_only": lambda p: p % 4 < 2, "alternate": lambda p: p % 2 == 0,
            "rare": lambda p: p % 7 == 3, "all": lambda p: True}


def _previous_keep_groups_with_signal(self, rollouts, loss_cfg) -> dict:
    """`RedTrainer.keep_groups_with_signal` as it was before: whole groups gathered every round."""
    cfg, dp = self.config, self.dp
    target, max_rounds = cfg.trainer.prompts_per_step, cfg.rollout.dynamic_sampling_max_rounds
    kept, dropped = [], []
    groups, extra_rounds = rollouts.groups, 0
    while True:
        for group in dp.gather(groups):
            (kept if group.has_signal(loss_cfg.offline_in_group) else dropped).append(group)
        if len(kept) >= target or extra_rounds == max_rounds:
            break
        extra_rounds += 1
        more = self.roll_out(dp.shard(self.stream.next_batch()), loss_cfg, extra_rounds)
        rollouts.sampled += more.sampled
        rollouts.branched += more.branched
        groups = more.groups
    self.order = [g.prompt_ids[0] for g in (kept + dropped)[:target]]
    rollouts.groups = dp.shard((kept + dropped)[:target])
    return {"dynamic/kept_groups": min(len(kept), target), "dynamic/extra_rounds": extra_rounds,
            "dynamic/prompts": target * (1 + extra_rounds)}


class _Trainer:
    """What `keep_groups_with_signal` reads of a `RedTrainer`; counts the groups that cross replicas."""

    def __init__(self, dp, signal, target=4, max_rounds=3):
        from megatron_red.distributed import DataParallel

        self.config = SimpleNamespace(trainer=SimpleNamespace(prompts_per_step=target),
                                      rollout=SimpleNamespace(dynamic_sampling_max_rounds=max_rounds))
        self.signal, self.next_prompt, self.sent_groups = signal, 0, 0
        outer = self

        class CountingDataParallel(DataParallel):
            def gather(self, items):
                outer.sent_groups += sum(type(y).__name__ == "Group" for x in items
                                         for y in (x if isinstance(x, tuple) else (x,)))  # (position, group) pairs
                return super().gather(items)

        self.dp = CountingDataParallel(dp.rank, dp.size, dp.group)
        self.stream = SimpleNamespace(next_batch=self.next_batch)

    def next_batch(self):
        batch = list(range(self.next_prompt, self.next_prompt + self.config.trainer.prompts_per_step))
        self.next_prompt += len(batch)
        return batch

    def roll_out(self, prompts, loss_cfg, round_=0):
        from megatron_red.trainer.groups import Group
        from megatron_red.trainer.red_trainer import Rollouts

        groups = [Group([p], responses=[[1], [2]], rewards=[1.0, 0.0] if self.signal(p) else [0.0, 0.0])
                  for p in prompts]
        return Rollouts(groups, sampled=list(groups))


def _worker(rank, world_size):
    import torch.distributed as dist

    from megatron_red.objectives import RedLossConfig
    from megatron_red.distributed import DataParallel
    from megatron_red.trainer.red_trainer import RedTrainer

    dp, loss_cfg, out = DataParallel(rank, world_size, dist.group.WORLD), RedLossConfig.grpo(), {}
    for name, signal in PATTERNS.items():
        for label, method in (("new", RedTrainer.keep_groups_with_signal),
                              ("previous", _previous_keep_groups_with_signal)):
            trainer = _Trainer(dp, signal)
            rollouts = trainer.roll_out(dp.shard(trainer.next_batch()), loss_cfg)
            metrics = method(trainer, rollouts, loss_cfg)
            out[name, label] = ([g.prompt_ids[0] for g in rollouts.groups], metrics, trainer.sent_groups,
                                sorted(g.prompt_ids[0] for g in rollouts.sampled), rollouts.positions,
                                getattr(trainer, "order", None))
    return out


def test_decisions_equal_the_previous_implementation_with_only_surplus_groups_sent():
    ranks = run_distributed(_worker, 2)
    for name in PATTERNS:
        new = [r[name, "new"] for r in ranks]
        previous = [r[name, "previous"] for r in ranks]
        # The same groups trained, as many on each replica; the same extra rounds and metrics; the same sampling.
        assert sorted(p for trained, *_ in new for p in trained) == sorted(p for trained, *_ in previous
                                                                           for p in trained), name
        assert [len(trained) for trained, *_ in new] == [len(trained) for trained, *_ in previous] == [2, 2]
        assert all(n[1] == p[1] and n[3] == p[3] for n, p in zip(new, previous)), name
        # Positions: the place of each trained group in the step's order, on every replica.
        order = previous[0][5]
        assert [[order.index(prompt) for prompt in n[0]] for n in new] == [n[4] for n in new], name
        assert sorted(p for n in new for p in n[4]) == list(range(4)), name
        # Groups travel only when a replica holds more than its share of the chosen ones, and then only those: the
        # ones a replica trains but did not sample (replica d samples prompts 4r + 2d and 4r + 2d + 1 of round r).
        sent_new, sent_previous = sum(n[2] for n in new), sum(p[2] for p in previous)
        moved = sum((p % 4) // 2 != d for d, (trained, *_) in enumerate(new) for p in trained)
        rounds = 1 + new[0][1]["dynamic/extra_rounds"]
        assert sent_previous == 4 * rounds  # every group, every round
        assert sent_new == moved == {"first_half_only": 2, "alternate": 0, "rare": 0, "all": 0}[name], name
    assert ranks[0]["rare", "new"][1]["dynamic/extra_rounds"] == 3  # the rounds ran out
    assert ranks[0]["first_half_only", "new"][1]["dynamic/extra_rounds"] == 1


def test_balance_with_one_replica_is_the_chosen_items_in_order():
    from megatron_red.distributed import DataParallel

    assert DataParallel().balance([(0, 2), (0, 0)], ["a", "b", "c"]) == ["c", "a"]
