"""PromptStream: epochs are permutations, batches are fixed-size, and a resumed stream repeats the original exactly."""
import json

import pytest

from megatron_red.data import PromptStream, RedExample


def examples(n):
    return [RedExample(f"u{i}", [i], [i, 1], str(i), None, f"p{i}", f"t{i}") for i in range(n)]


def uids(batch):
    return [e.uid for e in batch]


def test_epochs_are_seeded_permutations():
    stream = PromptStream(examples(12), batch_size=4, seed=3)
    epochs = [sum((uids(stream.next_batch()) for _ in range(3)), []) for _ in range(3)]
    for epoch in epochs:
        assert sorted(epoch) == sorted(f"u{i}" for i in range(12))
    assert epochs[0] != epochs[1]  # reshuffled each epoch
    again = PromptStream(examples(12), batch_size=4, seed=3)
    assert sum((uids(again.next_batch()) for _ in range(3)), []) == epochs[0]
    other = PromptStream(examples(12), batch_size=4, seed=4)
    assert sum((uids(other.next_batch()) for _ in range(3)), []) != epochs[0]


def test_batches_span_epoch_boundary():
    stream = PromptStream(examples(5), batch_size=3, seed=0)
    flat = sum((uids(stream.next_batch()) for _ in range(5)), [])  # 15 = three epochs of 5
    assert all(len(flat[i:i + 5]) == 5 and sorted(flat[i:i + 5]) == sorted(f"u{j}" for j in range(5))
               for i in (0, 5, 10))
    assert stream.state_dict()["epoch"] == 2 and stream.state_dict()["position"] == 5


@pytest.mark.parametrize("stop_after", [0, 2, 3, 7])
def test_resume_sees_exactly_the_same_batches(stop_after):
    reference = PromptStream(examples(10), batch_size=4, seed=11)
    expected = [uids(reference.next_batch()) for _ in range(stop_after + 8)]

    first = PromptStream(examples(10), batch_size=4, seed=11)
    seen = [uids(first.next_batch()) for _ in range(stop_after)]
    state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint would store it

    resumed = PromptStream(examples(10), batch_size=4, seed=0)  # the seed comes from the state
    resumed.load_state_dict(state)
    seen += [uids(resumed.next_batch()) for _ in range(8)]
    assert seen == expected


def test_bad_inputs():
    with pytest.raises(ValueError, match="at least one"):
        PromptStream([], 2)
    with pytest.raises(ValueError, match="batch_size"):
        PromptStream(examples(3), 0)
    state = PromptStream(examples(3), 2).state_dict()
    with pytest.raises(ValueError, match="3 examples"):
        PromptStream(examples(4), 2).load_state_dict(state)
