"""The micro-batcher under real asyncio concurrency, with a deterministic fake model."""

import asyncio
import itertools
import random
import time

import pytest

from service.batch_forming import BatchLimits, WorkItem, form_batches, padded_tokens, split_in_two
from service.batching import BatchSizeMismatch, MicroBatcher
from service.device_turns import DeviceTurns
from service.errors import NotReady

LIMITS = BatchLimits(max_batch_tokens=256, max_batch_size=8, max_wait_s=0.005)


class RecordingModel:
    """Records each batch of (key, length) payloads and returns "scored:<key>" per item, so
    every result can be traced to its item; `started` is set when a forward begins."""

    def __init__(self, fail_on=None, forward_s=0.0):
        self.batches: list[list[tuple[str, int]]] = []
        self.fail_on = fail_on
        self.forward_s = forward_s
        self.started = asyncio.Event()

    @property
    def keys(self) -> list[str]:
        """Every item's key, in the order the forwards ran them."""
        return [key for batch in self.batches for key, _ in batch]

    async def __call__(self, payloads):
        self.batches.append(list(payloads))
        self.started.set()
        await asyncio.sleep(self.forward_s)  # at 0: let other submitters interleave
        if self.fail_on is not None and any(p[0] == self.fail_on for p in payloads):
            raise RuntimeError("model exploded")
        return [f"scored:{key}" for key, _ in payloads]


async def run_requests(batcher, requests):
    async def one_request(request_id, lengths):
        await asyncio.sleep(random.random() * 0.002)
        futures = [
            batcher.submit((f"{request_id}/{i}", n), length=n) for i, n in enumerate(lengths)
        ]
        return await asyncio.gather(*futures, return_exceptions=True)

    return await asyncio.gather(*(one_request(r, lengths) for r, lengths in requests.items()))


async def test_hundred_concurrent_requests_each_get_their_own_results():
    rng = random.Random(0)
    requests = {
        f"req{r}": [rng.randint(1, 60) for _ in range(rng.randint(1, 12))] for r in range(100)
    }
    model = RecordingModel()
    batcher = MicroBatcher(model, LIMITS)
    batcher.start()
    try:
        results = await run_requests(batcher, requests)
    finally:
        await batcher.stop()
    for (request_id, lengths), got in zip(requests.items(), results, strict=True):
        assert got == [f"scored:{request_id}/{i}" for i in range(len(lengths))]
    assert len(model.batches) < sum(len(v) for v in requests.values())  # batching happened
    for batch in model.batches:
        assert len(batch) <= LIMITS.max_batch_size
        lengths = [n for _, n in batch]
        assert len(batch) == 1 or len(batch) * max(lengths) <= LIMITS.max_batch_tokens


async def test_a_lone_item_is_flushed_after_the_wait():
    model = RecordingModel()
    batcher = MicroBatcher(model, LIMITS)
    batcher.start()
    try:
        assert await asyncio.wait_for(batcher.submit(("solo", 3), length=3), 2) == "scored:solo"
    finally:
        await batcher.stop()


async def test_a_failing_batch_fails_only_its_own_items():
    model = RecordingModel(fail_on="bad")
    limits = BatchLimits(max_batch_tokens=10_000, max_batch_size=1, max_wait_s=0.001)
    batcher = MicroBatcher(model, limits)
    batcher.start()
    try:
        good = batcher.submit(("good", 2), length=2)
        bad = batcher.submit(("bad", 2), length=2)
        results = await asyncio.gather(good, bad, return_exceptions=True)
    finally:
        await batcher.stop()
    assert results[0] == "scored:good"
    assert isinstance(results[1], RuntimeError)


async def test_a_batch_returning_too_few_results_fails_every_item():
    async def drops_one(payloads):
        return payloads[:-1]

    batcher = MicroBatcher(drops_one, BatchLimits(1000, 8, 0.01))
    batcher.start()
    try:
        futures = [batcher.submit(i, length=1) for i in range(3)]
        results = await asyncio.gather(*futures, return_exceptions=True)
    finally:
        await batcher.stop()
    assert all(isinstance(r, BatchSizeMismatch) for r in results)


async def test_cancelled_items_never_reach_the_model():
    model = RecordingModel()
    batcher = MicroBatcher(model, BatchLimits(1000, 8, 0.05))
    batcher.start()
    try:
        gone = batcher.submit(("gone", 1), length=1)
        kept = batcher.submit(("kept", 1), length=1)
        gone.cancel()
        assert await kept == "scored:kept"
    finally:
        await batcher.stop()
    assert model.keys == ["kept"]


def make_item(length, rows=1):
    loop = asyncio.new_event_loop()
    try:
        return WorkItem(None, length, rows, length * rows, loop.create_future(), 0.0)
    finally:
        loop.close()


def test_form_batches_sorts_by_length_and_respects_the_padded_budget():
    items = [make_item(n) for n in (50, 3, 40, 5, 4, 45)]
    batches = form_batches(items, BatchLimits(max_batch_tokens=100, max_batch_size=8, max_wait_s=0))
    assert [[i.length for i in b] for b in batches] == [[3, 4, 5], [40, 45], [50]]


def test_form_batches_counts_rows_of_multi_row_items():
    items = [make_item(10, rows=6), make_item(10, rows=6)]
    batches = form_batches(items, BatchLimits(max_batch_tokens=100, max_batch_size=8, max_wait_s=0))
    assert len(batches) == 2


@pytest.mark.parametrize("size_cap", [1, 2, 3])
def test_form_batches_respects_the_size_cap(size_cap):
    items = [make_item(1) for _ in range(7)]
    limits = BatchLimits(max_batch_tokens=10_000, max_batch_size=size_cap, max_wait_s=0)
    assert all(len(b) <= size_cap for b in form_batches(items, limits))


def test_form_batches_cuts_before_padding_efficiency_drops_below_the_floor():
    items = [make_item(n) for n in (10, 11, 12, 30, 32, 90)]
    limits = BatchLimits(10_000, 64, 0, min_padding_efficiency=0.85)
    batches = form_batches(items, limits)
    assert [[i.length for i in b] for b in batches] == [[10, 11, 12], [30, 32], [90]]
    for batch in batches:
        real = sum(i.tokens for i in batch)
        assert real >= 0.85 * len(batch) * max(i.length for i in batch)
    # Without the floor, the same items share one batch.
    assert len(form_batches(items, BatchLimits(10_000, 64, 0))) == 1


def test_in_arrival_order_batches_keep_the_order_and_the_size_cap():
    items = [make_item(n) for n in (50, 3, 40, 5, 4, 45, 7)]
    limits = BatchLimits(10_000, max_batch_size=3, max_wait_s=0, arrival_order=True)
    batches = form_batches(items, limits)
    assert [[i.length for i in b] for b in batches] == [[50, 3, 40], [5, 4, 45], [7]]


def test_in_arrival_order_the_budget_counts_the_models_own_layout():
    """Rows padded to the longest (4 x 50 = 200) exceed a budget of 150 that the model's
    own layout (here: real tokens, as tight packing would give) stays under."""
    items = [make_item(n) for n in (50, 10, 10, 10, 40, 40)]
    limits = BatchLimits(150, max_batch_size=8, max_wait_s=0, arrival_order=True)
    real = lambda batch: sum(i.tokens for i in batch)  # noqa: E731
    batches = form_batches(items, limits, real)
    assert [[i.length for i in b] for b in batches] == [[50, 10, 10, 10, 40], [40]]
    # Counted as rectangles, the same budget cuts sooner.
    assert [len(b) for b in form_batches(items, limits)] == [3, 3]


def test_in_arrival_order_an_item_over_the_budget_still_gets_a_batch_of_its_own():
    items = [make_item(n) for n in (5, 500, 5)]
    limits = BatchLimits(100, max_batch_size=8, max_wait_s=0, arrival_order=True)
    assert [[i.length for i in b] for b in form_batches(items, limits)] == [[5], [500], [5]]


@pytest.mark.parametrize("arrival_order", [False, True])
async def test_in_arrival_order_no_item_is_overtaken_by_a_younger_one(arrival_order):
    """Sorted by length, the oldest item's batch takes its length's neighbours, younger
    ones among them, before an older item of another length; in arrival order (models
    that pack their rows) each forward takes the oldest items."""
    model = RecordingModel(forward_s=0.01)
    limits = BatchLimits(10_000, max_batch_size=2, max_wait_s=0.001, arrival_order=arrival_order)
    batcher = MicroBatcher(model, limits)
    batcher.start()
    try:
        first = batcher.submit(("first", 1), length=1)
        await model.started.wait()  # the rest arrive during its forward, oldest first
        rest = [batcher.submit((key, n), length=n) for key, n in OLD_THEN_YOUNG]
        await asyncio.gather(first, *rest)
    finally:
        await batcher.stop()
    if arrival_order:
        assert model.keys == ["first", "old_long", "old_short", "young_long", "young_short"]
    else:  # sorted: [old_short, young_short], [old_long, young_long]; the oldest's goes
        assert model.keys == ["first", "old_long", "young_long", "old_short", "young_short"]


async def _run_during_a_first_forward(batcher, model, submissions):
    """Submit (key, length, owner) items while a first item's forward runs, so that they
    are all pending at the next choice; every item's key, in the order forwards ran them."""
    batcher.start()
    try:
        first = batcher.submit(("first", 1), length=1, owner="first")
        await model.started.wait()
        rest = [batcher.submit((key, n), length=n, owner=owner) for key, n, owner in submissions]
        await asyncio.gather(first, *rest)
    finally:
        await batcher.stop()
    return [[key for key, _ in batch] for batch in model.batches[1:]]


async def test_in_arrival_order_trainers_take_turns_where_the_last_batch_stopped():
    """A batch of the oldest items in fair order spans several trainers; the next goes on
    with the trainer after the last one served, so no trainer's item is passed over."""
    model = RecordingModel(forward_s=0.01)
    limits = BatchLimits(10_000, max_batch_size=2, max_wait_s=0.001, arrival_order=True)
    owners = "AAABBCC"
    submissions = [(f"{o}{owners[:i].count(o) + 1}", 1, o) for i, o in enumerate(owners)]
    batches = await _run_during_a_first_forward(MicroBatcher(model, limits), model, submissions)
    assert batches == [["A1", "B1"], ["C1", "A2"], ["B2", "C2"], ["A3"]]


async def test_in_arrival_order_the_batcher_cuts_by_the_models_own_padded_count():
    model = RecordingModel(forward_s=0.01)
    limits = BatchLimits(100, max_batch_size=8, max_wait_s=0.001, arrival_order=True)
    real_tokens = lambda payloads: sum(n for _, n in payloads)  # noqa: E731
    submissions = [("long", 60, ""), ("short1", 30, ""), ("short2", 30, "")]
    counted = MicroBatcher(model, limits, count_padded=real_tokens)
    assert await _run_during_a_first_forward(counted, model, submissions) == [
        ["long", "short1"],  # 90 tokens as the model counts them; 2 x 60 as rectangles
        ["short2"],
    ]
    model = RecordingModel(forward_s=0.01)
    rectangles = await _run_during_a_first_forward(MicroBatcher(model, limits), model, submissions)
    assert rectangles == [["long"], ["short1", "short2"]]


OLD_THEN_YOUNG = [("old_long", 90), ("old_short", 1), ("young_long", 90), ("young_short", 1)]


@pytest.mark.parametrize("small_length", [4, 40])
async def test_a_flooding_owner_delays_another_owner_by_about_one_forward_per_owner(
    small_length,
):
    model = RecordingModel(forward_s=0.001)
    limits = BatchLimits(max_batch_tokens=10_000, max_batch_size=8, max_wait_s=0.001)
    batcher = MicroBatcher(model, limits)
    batcher.start()
    try:
        flood = [batcher.submit(("big", 4), length=4, owner="big") for _ in range(1000)]
        await asyncio.sleep(0)  # the flood is queued first
        small = batcher.submit(("small", small_length), length=small_length, owner="small")
        await small
        done_when_small_finished = sum(f.done() for f in flood)
        await asyncio.gather(*flood)
    finally:
        await batcher.stop()
    # The forward already running when it arrived, then at most one per owner (a length of
    # its own puts it in a batch of its own, after one of the flood's): not after 1000.
    assert model.keys.index("small") <= 3 * limits.max_batch_size
    assert done_when_small_finished <= 3 * limits.max_batch_size


def test_form_batches_cuts_where_padding_costs_more_than_a_forward_call():
    items = [make_item(n) for n in (10, 11, 12, 30, 32, 90)] + [make_item(12, rows=4)]
    limits = BatchLimits(10_000, 64, 0, forward_overhead_tokens=40)
    batches = form_batches(items, limits)
    # 7 rows up to 30 would add 7 x 18 padded tokens > 40; 2 rows up to 90 add 2 x 58 > 40.
    assert [[(i.length, i.rows) for i in b] for b in batches] == [
        [(10, 1), (11, 1), (12, 1), (12, 4)],
        [(30, 1), (32, 1)],
        [(90, 1)],
    ]
    cheap_padding = BatchLimits(10_000, 64, 0, forward_overhead_tokens=10_000)
    assert len(form_batches(items, cheap_padding)) == 1


async def test_with_announcements_a_batch_waits_only_for_items_on_their_way():
    model = RecordingModel()
    slow_wait = BatchLimits(max_batch_tokens=10_000, max_batch_size=8, max_wait_s=5.0)
    batcher = MicroBatcher(model, slow_wait, announced_arrivals=True)
    batcher.start()
    try:
        # Nothing announced: a lone item goes at once, not after the 5 s wait.
        assert await asyncio.wait_for(batcher.submit(("solo", 3), length=3), 1) == "scored:solo"
        # Two announced, one submitted: the batch holds for the second, then both go together.
        batcher.announce(2)
        first = batcher.submit(("a", 3), length=3)
        await asyncio.sleep(0.05)
        assert not first.done()
        second = batcher.submit(("b", 3), length=3)
        assert await asyncio.wait_for(asyncio.gather(first, second), 1) == ["scored:a", "scored:b"]
        assert model.batches[-1] == [("a", 3), ("b", 3)]
        # An announced item whose caller gave up releases the batch held for it.
        batcher.announce(2)
        third = batcher.submit(("c", 3), length=3)
        await asyncio.sleep(0.05)
        assert not third.done()
        batcher.withdraw(1)
        assert await asyncio.wait_for(third, 1) == "scored:c"
    finally:
        await batcher.stop()


async def test_items_that_arrive_during_a_forward_join_the_leftovers_of_the_last_choice():
    model = RecordingModel(forward_s=0.05)
    limits = BatchLimits(max_batch_tokens=10_000, max_batch_size=2, max_wait_s=0.001)
    batcher = MicroBatcher(model, limits)
    batcher.start()
    try:
        futures = [batcher.submit(("a", 4), length=4)]
        await model.started.wait()
        model.started.clear()
        futures += [batcher.submit((key, 4), length=4) for key in "bcd"]  # while "a" runs
        await model.started.wait()  # "b", "c" run; "d" is left over
        futures.append(batcher.submit(("e", 4), length=4))
        await asyncio.gather(*futures)
    finally:
        await batcher.stop()
    # Each batch is chosen when the model is free, from everything pending by then.
    assert [[key for key, _ in batch] for batch in model.batches] == [
        ["a"],
        ["b", "c"],
        ["d", "e"],
    ]


async def two_items_apart(fill_wait_s: float, max_batch_size: int):
    """(each batch's keys, seconds from the first submit until both are scored) for two
    items submitted 50 ms apart: a client's reply just out, its next request on its way."""
    model = RecordingModel()
    limits = BatchLimits(10_000, max_batch_size, max_wait_s=0.001, fill_wait_s=fill_wait_s)
    batcher = MicroBatcher(model, limits, announced_arrivals=True)
    batcher.start()
    try:
        started = time.monotonic()
        first = batcher.submit(("a", 3), length=3)
        await asyncio.sleep(0.05)
        assert await asyncio.gather(first, batcher.submit(("b", 3), length=3)) == [
            "scored:a",
            "scored:b",
        ]
        took = time.monotonic() - started
    finally:
        await batcher.stop()
    return [[key for key, _ in batch] for batch in model.batches], took


async def test_with_a_fill_wait_a_batch_that_has_the_device_waits_for_company():
    assert (await two_items_apart(0.0, max_batch_size=2))[0] == [["a"], ["b"]]
    batches, took = await two_items_apart(0.5, max_batch_size=2)
    assert batches == [["a", "b"]]
    assert took < 0.35  # full at two: it went at once, not at the end of the wait


async def test_a_fill_wait_ends_with_what_arrived_by_then():
    batches, took = await two_items_apart(0.2, max_batch_size=8)
    assert batches == [["a", "b"]]
    assert 0.2 <= took < 1.0  # never full at 8: the whole wait, then both together


async def test_a_fill_wait_is_skipped_when_it_would_outlast_a_pending_deadline():
    model = RecordingModel()
    limits = BatchLimits(10_000, max_batch_size=8, max_wait_s=0.001, fill_wait_s=5.0)
    batcher = MicroBatcher(model, limits, announced_arrivals=True)
    batcher.start()
    try:
        started = time.monotonic()
        due = batcher.submit(("due", 3), length=3, deadline=started + 1.0)
        assert await asyncio.wait_for(due, 0.9) == "scored:due"  # run at once, not dropped
    finally:
        await batcher.stop()


async def test_another_models_batch_waits_out_a_fill_on_a_shared_slot_and_runs_next():
    """A fill holds the device (that is its price); the other model's item, pending
    meanwhile, runs right after the filled batch, and nothing runs twice or is lost."""
    turns = DeviceTurns()  # one slot, as on a GPU
    filling, other = RecordingModel(), RecordingModel()
    fill = BatchLimits(10_000, max_batch_size=8, max_wait_s=0.001, fill_wait_s=0.3)
    plain = BatchLimits(10_000, max_batch_size=8, max_wait_s=0.001)
    filler = MicroBatcher(filling, fill, announced_arrivals=True, device_turns=turns)
    waiter = MicroBatcher(other, plain, announced_arrivals=True, device_turns=turns)
    filler.start()
    waiter.start()
    try:
        started = time.monotonic()
        first = filler.submit(("a", 3), length=3)
        await asyncio.sleep(0.05)  # the filler has the device and waits for company
        waiting = waiter.submit(("x", 3), length=3)
        second = filler.submit(("b", 3), length=3)
        assert await asyncio.wait_for(waiting, 2) == "scored:x"
        waited = time.monotonic() - started
        assert await asyncio.gather(first, second) == ["scored:a", "scored:b"]
    finally:
        await filler.stop()
        await waiter.stop()
    assert [[key for key, _ in batch] for batch in filling.batches] == [["a", "b"]]
    assert other.batches == [[("x", 3)]]
    assert 0.3 <= waited < 1.5  # after the fill's wait, not starved behind it


async def test_stopping_during_a_fill_fails_its_items_and_frees_the_device():
    turns = DeviceTurns()
    model = RecordingModel()
    limits = BatchLimits(10_000, max_batch_size=8, max_wait_s=0.001, fill_wait_s=30.0)
    batcher = MicroBatcher(model, limits, announced_arrivals=True, device_turns=turns)
    batcher.start()
    waiting = batcher.submit(("a", 3), length=3)
    await asyncio.sleep(0.05)  # in the fill, holding the device
    await asyncio.wait_for(batcher.stop(), 1)  # not at the end of the 30 s wait
    assert isinstance(waiting.exception(), NotReady)
    assert model.batches == []
    assert turns.take_free_slot()  # the turn the fill held was given back


async def test_batchers_sharing_a_device_never_run_at_once_and_the_oldest_work_goes_first():
    turns = DeviceTurns()
    running = 0
    overlapped = False
    order: list[str] = []

    def model(name):
        async def run(payloads):
            nonlocal running, overlapped
            running += 1
            overlapped |= running > 1
            order.extend(f"{name}:{p}" for p in payloads)
            await asyncio.sleep(0.02)
            running -= 1
            return payloads

        return run

    limits = BatchLimits(max_batch_tokens=10_000, max_batch_size=1, max_wait_s=0.001)
    first = MicroBatcher(model("first"), limits, device_turns=turns)
    second = MicroBatcher(model("second"), limits, device_turns=turns)
    first.start()
    second.start()
    try:
        older = [first.submit(i, length=1) for i in range(3)]
        await asyncio.sleep(0.005)
        younger = second.submit(0, length=1)
        await asyncio.gather(*older, younger)
    finally:
        await first.stop()
        await second.stop()
    assert not overlapped
    # The second model's item arrived after all of the first model's: it waits for them.
    assert order == ["first:0", "first:1", "first:2", "second:0"]


async def test_with_two_slots_a_model_runs_two_batches_at_once_and_no_item_twice():
    turns = DeviceTurns(slots=2)
    running = 0
    most_at_once = 0
    seen: list[int] = []

    async def run(payloads):
        nonlocal running, most_at_once
        running += 1
        most_at_once = max(most_at_once, running)
        seen.extend(payloads)
        await asyncio.sleep(0.02)
        running -= 1
        return [p * 10 for p in payloads]

    limits = BatchLimits(max_batch_tokens=10_000, max_batch_size=4, max_wait_s=0.001)
    batcher = MicroBatcher(run, limits, device_turns=turns, concurrent_batches=2)
    batcher.start()
    try:
        results = await asyncio.gather(*(batcher.submit(i, length=1) for i in range(40)))
    finally:
        await batcher.stop()
    assert results == [i * 10 for i in range(40)]
    assert sorted(seen) == list(range(40))  # every item in exactly one forward
    assert most_at_once == 2  # the device's two slots were used, never more


class HalvesModel:
    """Records each call's payloads and when it ran, to see whether halves overlapped."""

    def __init__(self, forward_s: float) -> None:
        self.forward_s = forward_s
        self.calls: list[tuple[list[int], float, float]] = []
        self.running = 0  # forwards under way
        self.started = asyncio.Event()  # set when a forward begins

    async def __call__(self, payloads):
        started = time.monotonic()
        self.running += 1
        self.started.set()
        try:
            await asyncio.sleep(self.forward_s)
        finally:
            self.running -= 1
        self.calls.append((list(payloads), started, time.monotonic()))
        return [p * 10 for p in payloads]

    def overlapped(self) -> bool:
        (_, start_a, end_a), (_, start_b, end_b) = self.calls
        return start_a < end_b and start_b < end_a


async def score_on_shared_device(turns, model, other_holder_leaves=None):
    """Six items through a batcher on a two-slot device whose other slot is held by
    another model's forward (None: no other model) until `other_holder_leaves` is set."""
    limits = BatchLimits(max_batch_tokens=10_000, max_batch_size=64, max_wait_s=0.001)
    batcher = MicroBatcher(model, limits, device_turns=turns)
    held = asyncio.Event()

    async def other_model() -> None:
        async with turns.turn(lambda: 0.0):
            held.set()
            await other_holder_leaves.wait()

    other = None
    if other_holder_leaves is not None:
        other = asyncio.create_task(other_model())
        await held.wait()
    batcher.start()
    try:
        lengths = [3, 9, 1, 7, 5, 2]
        futures = [batcher.submit(i, length=n) for i, n in enumerate(lengths)]
        results = await asyncio.gather(*futures)
    finally:
        if other_holder_leaves is not None:
            other_holder_leaves.set()
        await batcher.stop()
    if other is not None:
        await other
    return results


async def test_on_two_slots_a_last_batch_runs_as_halves_side_by_side_when_a_slot_is_free():
    model = HalvesModel(forward_s=0.1)
    results = await score_on_shared_device(DeviceTurns(slots=2), model, None)
    assert results == [i * 10 for i in range(6)]  # each item's own result
    assert len(model.calls) == 2  # one batch, in two halves
    assert sorted(model.calls[0][0] + model.calls[1][0]) == list(range(6))
    assert {len(model.calls[0][0]), len(model.calls[1][0])} == {3}
    assert model.overlapped()


@pytest.mark.parametrize("leaves", ["as-the-forward-starts", "after-it"])
async def test_while_another_model_holds_the_other_slot_a_last_batch_runs_whole(leaves):
    """Halves one after the other on one slot would cost more per item and answer half
    the requests a forward later; a slot that frees meanwhile is not waited for."""
    model = HalvesModel(forward_s=0.1)
    turns = DeviceTurns(slots=2)
    holder_leaves = model.started if leaves == "as-the-forward-starts" else asyncio.Event()
    results = await score_on_shared_device(turns, model, holder_leaves)
    assert results == [i * 10 for i in range(6)]
    assert [sorted(payloads) for payloads, _, _ in model.calls] == [list(range(6))]
    async with asyncio.timeout(1), turns.turn(lambda: 0.0), turns.turn(lambda: 0.0):
        pass  # both slots are free again


async def test_with_a_slot_free_a_last_batch_runs_whole_while_another_model_expects_work():
    """The free slot is kept for the other model's items on their way (being tokenised)."""
    turns = DeviceTurns(slots=2)
    model = HalvesModel(forward_s=0.05)
    limits = BatchLimits(max_batch_tokens=10_000, max_batch_size=64, max_wait_s=0.001)
    batcher = MicroBatcher(model, limits, device_turns=turns)
    other = MicroBatcher(HalvesModel(forward_s=0.01), limits, device_turns=turns)
    other.announce(1)
    batcher.start()
    try:
        futures = [batcher.submit(i, length=n) for i, n in enumerate([3, 9, 1, 7, 5, 2])]
        assert await asyncio.gather(*futures) == [i * 10 for i in range(6)]
    finally:
        await batcher.stop()
    assert [sorted(payloads) for payloads, _, _ in model.calls] == [list(range(6))]


async def test_on_one_slot_a_batch_runs_whole():
    model = HalvesModel(forward_s=0.01)
    results = await score_on_shared_device(DeviceTurns(slots=1), model, None)
    assert results == [i * 10 for i in range(6)]
    assert [sorted(payloads) for payloads, _, _ in model.calls] == [list(range(6))]


def test_split_in_two_gives_halves_of_about_equal_padded_size():
    rng = random.Random(7)
    items = [
        WorkItem(key, rng.randint(30, 40), rng.randint(1, 6), 1, None, 0.0)  # type: ignore[arg-type]
        for key in range(20)
    ]
    first, second = split_in_two(items)
    assert sorted(i.payload for i in first + second) == list(range(20))  # each item once
    sizes = sorted([padded_tokens(first), padded_tokens(second)])
    assert sizes[1] <= 0.6 * padded_tokens(items)  # neither half does most of the work
    assert sizes[0] >= 0.4 * sum(i.rows * i.length for i in items)


async def test_stopping_fails_both_halves_and_frees_both_slots():
    turns = DeviceTurns(slots=2)
    model = HalvesModel(forward_s=10.0)
    limits = BatchLimits(max_batch_tokens=10_000, max_batch_size=64, max_wait_s=0.001)
    batcher = MicroBatcher(model, limits, device_turns=turns)
    batcher.start()
    futures = [batcher.submit(i, length=n) for i, n in enumerate([3, 9, 1, 7])]
    await asyncio.sleep(0.02)  # both halves run, one on each slot
    assert model.running == 2
    await asyncio.wait_for(batcher.stop(), 1)
    # No item is left hanging: both halves' callers hear the service is stopping (503).
    assert all(isinstance(f.exception(), NotReady) for f in futures)
    async with asyncio.timeout(1), turns.turn(lambda: 0.0), turns.turn(lambda: 0.0):
        pass  # both slots are free again: nothing the batcher held is left taken


async def test_a_last_batch_runs_whole_while_another_models_items_wait():
    turns = DeviceTurns(slots=2)
    model, other_model = HalvesModel(forward_s=0.05), HalvesModel(forward_s=0.01)
    limits = BatchLimits(max_batch_tokens=10_000, max_batch_size=3, max_wait_s=0.001)
    batcher = MicroBatcher(model, limits, device_turns=turns, concurrent_batches=2)
    other = MicroBatcher(other_model, limits, device_turns=turns, concurrent_batches=2)
    release_holder = asyncio.Event()

    async def hold_a_slot() -> None:
        async with turns.turn(lambda: 0.0):
            await release_holder.wait()

    holder = asyncio.create_task(hold_a_slot())
    await asyncio.sleep(0)
    batcher.start()
    other.start()
    try:
        futures = [batcher.submit(i, length=1) for i in range(6)]  # two batches of three
        await asyncio.sleep(0.02)  # the first batch runs on the free slot
        other_future = other.submit(100, length=1)  # waits: both slots are taken
        results = await asyncio.gather(*futures)
        release_holder.set()
        assert await other_future == 1000
    finally:
        release_holder.set()
        await batcher.stop()
        await other.stop()
    await holder
    assert results == [i * 10 for i in range(6)]
    # The second batch is the model's last, but no slot is free (the holder has one, the
    # first batch the other): it runs whole.
    assert [len(payloads) for payloads, _, _ in model.calls] == [3, 3]


def started_on_two_slots(*models: tuple[HalvesModel, int]) -> list[MicroBatcher]:
    """Started batchers, one per (model, max batch size), sharing one two-slot device, each
    told of items on their way (`announce`) as the engine does."""
    turns = DeviceTurns(slots=2)
    batchers = [
        MicroBatcher(
            model,
            BatchLimits(max_batch_tokens=10_000, max_batch_size=size, max_wait_s=0.001),
            announced_arrivals=True,
            device_turns=turns,
            concurrent_batches=2,
        )
        for model, size in models
    ]
    for batcher in batchers:
        batcher.start()
    return batchers


async def test_a_fast_model_leaves_a_slot_for_a_slow_models_items_on_their_way():
    """Two models share two slots; each request's items reach the fast model at once and
    the slow one 30 ms later (its tokenising takes longer). The fast model runs its batches
    on one slot: the other stays for the slow model, whose batch then starts at once."""
    fast, slow = HalvesModel(forward_s=0.02), HalvesModel(forward_s=0.1)
    fast_batcher, slow_batcher = started_on_two_slots((fast, 1), (slow, 8))
    try:
        fast_batcher.announce(4)
        slow_batcher.announce(4)
        fast_futures = [fast_batcher.submit(i, length=1) for i in range(4)]
        await asyncio.sleep(0.03)
        slow_submitted = time.monotonic()
        slow_futures = [slow_batcher.submit(i, length=1) for i in range(4)]
        results = await asyncio.gather(*fast_futures, *slow_futures)
    finally:
        await fast_batcher.stop()
        await slow_batcher.stop()
    assert results == [i * 10 for i in range(4)] * 2
    assert len(fast.calls) == 4  # one item per batch
    starts = sorted((start, end) for _, start, end in fast.calls)
    # One fast batch at a time: the second slot was kept for the slow model's items.
    assert all(end <= next_start for (_, end), (next_start, _) in itertools.pairwise(starts))
    [(_, slow_started, _)] = slow.calls  # one batch of four items
    assert slow_started - slow_submitted < 0.01  # it found a slot free


async def test_stopping_fails_the_items_of_a_forward_cut_short_and_of_the_queue():
    model = RecordingModel(forward_s=10.0)
    batcher = MicroBatcher(model, BatchLimits(max_batch_tokens=256, max_batch_size=2, max_wait_s=0))
    batcher.start()
    futures = [batcher.submit((f"k{i}", 3), length=3) for i in range(4)]  # two batches
    await asyncio.wait_for(model.started.wait(), 1)  # the first batch's forward runs
    await asyncio.wait_for(batcher.stop(), 1)
    assert len(model.batches) == 1
    # Running or queued, every caller gets an answer: 503, retry (none waits forever).
    assert all(isinstance(f.exception(), NotReady) for f in futures)


async def test_withdrawn_expected_work_frees_the_slot_kept_for_it():
    """A model's second batch waits for a spare turn while another model's items are on
    their way; when their caller leaves (withdrawn), the second batch starts at once
    instead of waiting for the first to finish."""
    model, other_model = HalvesModel(forward_s=0.3), HalvesModel(forward_s=0.01)
    batcher, other = started_on_two_slots((model, 2), (other_model, 2))
    try:
        other.announce(3)  # being tokenised: a free slot is kept for them
        futures = [batcher.submit(i, length=1) for i in range(4)]  # two batches of two
        await asyncio.sleep(0.05)
        assert model.running == 1  # the second batch waits for a spare turn
        withdrawn_at = time.monotonic()
        other.withdraw(3)
        results = await asyncio.gather(*futures)
    finally:
        await batcher.stop()
        await other.stop()
    assert results == [i * 10 for i in range(4)]
    starts = sorted(started for _, started, _ in model.calls)
    assert starts[1] - withdrawn_at < 0.1  # the second batch: not after the first's 0.3 s
    assert other_model.calls == []
