"""The resumable, device-independent data order."""

from __future__ import annotations

import pytest

from unfog.data import ResumableSampler, step_seed


def _batches(size: int, batch: int, start: int, rank: int, world: int) -> list[list[int]]:
    s = ResumableSampler(size, batch, seed=3, position=lambda: (start, rank, world))
    idx = list(s)
    return [idx[i : i + batch] for i in range(0, len(idx), batch)]


def test_each_pass_is_a_permutation_and_passes_differ():
    s = ResumableSampler(10, 5, seed=0)
    first, second = s.indices(0, 10), s.indices(10, 10)
    assert sorted(first) == list(range(10)) and sorted(second) == list(range(10))
    assert first != second


def test_starting_at_batch_k_continues_the_stream():
    whole = _batches(10, 3, 0, 0, 1) + _batches(10, 3, 4, 0, 1)
    assert _batches(10, 3, 2, 0, 1)[:2] == whole[2:4]  # crossing a pass boundary too


@pytest.mark.parametrize("world", [2, 3])
def test_processes_together_read_one_big_batch(world):
    one = _batches(50, 4 * world, 1, 0, 1)
    shards = [_batches(50, 4, 1, r, world) for r in range(world)]
    for k, big in enumerate(one):
        assert [i for r in range(world) for i in shards[r][k]] == big


def test_seeds_differ_by_batch_and_rank_and_repeat():
    assert step_seed(0, 1, 0) == step_seed(0, 1, 0)
    assert len({step_seed(0, b, r) for b in range(50) for r in range(4)}) == 200


def test_bad_sizes_refused():
    with pytest.raises(ValueError, match="size"):
        ResumableSampler(0, 4)


@pytest.mark.parametrize(("n", "world"), [(10, 2), (10, 3), (1, 2), (5, 4)])
def test_sample_shards_cover_everything_with_equal_lengths(n, world):
    from unfog.sampling import shard

    shards = [shard(n, r, world) for r in range(world)]
    assert len({len(s) for s in shards}) == 1, "every process must run the same number of forwards"
    assert sorted({i for s in shards for i in s}) == list(range(n))
