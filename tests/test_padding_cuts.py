"""The cheapest cut of length-sorted rows into forwards, checked against brute force."""

import itertools
import random

import pytest

from service.models.loading import chunked_padded_tokens, length_sorted_chunks
from service.padding_cuts import cheapest_cuts


def cost_of(cuts, lengths, rows, overhead):
    return sum(overhead + sum(rows[start:end]) * lengths[end - 1] for start, end in cuts)


def every_partition(count):
    """All ways to cut `count` sorted entries into contiguous runs."""
    for mask in itertools.product((False, True), repeat=count - 1):
        bounds = [0] + [i + 1 for i, cut in enumerate(mask) if cut] + [count]
        yield list(itertools.pairwise(bounds))


def feasible(cuts, lengths, rows, tokens, max_entries, max_padded, min_efficiency):
    for start, end in cuts:
        if end - start == 1:
            continue  # a single entry always goes
        padded = sum(rows[start:end]) * lengths[end - 1]
        if end - start > max_entries or padded > max_padded:
            return False
        if sum(tokens[start:end]) < min_efficiency * padded:
            return False
    return True


@pytest.mark.parametrize("seed", range(40))
def test_the_cut_costs_no_more_than_any_other_feasible_cut(seed):
    rng = random.Random(seed)
    count = rng.randint(1, 8)
    lengths = sorted(rng.randint(1, 120) for _ in range(count))
    rows = [rng.randint(1, 4) for _ in range(count)]
    # Multi-row entries hold fewer real tokens than rows x longest.
    tokens = [
        r * length - (rng.randint(0, length - 1) if r > 1 else 0)
        for r, length in zip(rows, lengths, strict=True)
    ]
    overhead = rng.choice([0, 10, 64, 500])
    limits = {"max_entries": rng.randint(1, 8), "max_padded": rng.randint(50, 2000)}
    min_efficiency = rng.choice([0.0, 0.5, 0.8])
    cuts = cheapest_cuts(
        lengths,
        rows,
        tokens,
        overhead,
        limits["max_entries"],
        limits["max_padded"],
        min_efficiency,
    )
    assert [start for start, _ in cuts] == [0] + [end for _, end in cuts[:-1]]
    assert cuts[-1][1] == count
    args = (lengths, rows, tokens, limits["max_entries"], limits["max_padded"], min_efficiency)
    assert feasible(cuts, *args)
    best = min(
        cost_of(c, lengths, rows, overhead) for c in every_partition(count) if feasible(c, *args)
    )
    assert cost_of(cuts, lengths, rows, overhead) == best


def test_a_free_forward_cuts_at_every_length_and_a_dear_one_never():
    lengths, rows = [3, 5, 9], [1, 1, 1]
    assert cheapest_cuts(lengths, rows, lengths, 0) == [(0, 1), (1, 2), (2, 3)]
    assert cheapest_cuts(lengths, rows, lengths, 10_000) == [(0, 3)]
    # Equal lengths never pay for a second forward.
    assert cheapest_cuts([4, 4, 4], rows, [4, 4, 4], 0) == [(0, 3)]


def test_an_entry_over_every_limit_still_forms_a_batch_of_one():
    assert cheapest_cuts([5, 900], [1, 1], [5, 900], 64, max_padded_tokens=100) == [
        (0, 1),
        (1, 2),
    ]


def test_row_chunks_group_equal_lengths_and_cover_every_row_once():
    rng = random.Random(7)
    lengths = [rng.choice([6, 6, 7, 12, 30, 31, 90]) for _ in range(40)]
    chunks = length_sorted_chunks(lengths, 64)
    assert sorted(i for chunk in chunks for i in chunk) == list(range(40))
    for chunk in chunks:  # no length is split across two forwards
        for other in chunks:
            if other is not chunk:
                assert not {lengths[i] for i in chunk} & {lengths[i] for i in other}
    # Fewer padded tokens than one rectangle, and the count matches the chunks run.
    assert chunked_padded_tokens(lengths, 64) == sum(
        len(chunk) * max(lengths[i] for i in chunk) for chunk in chunks
    )
    assert chunked_padded_tokens(lengths, 64) < len(lengths) * max(lengths)
