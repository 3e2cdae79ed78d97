"""Models sharing a device take turns: the one whose oldest pending item waited longest."""

import asyncio
import contextlib
import math

from service.device_turns import DeviceTurns


async def test_the_turn_goes_to_the_waiter_with_the_oldest_item_not_the_first_to_ask():
    turns = DeviceTurns()
    order: list[str] = []
    holder_may_leave = asyncio.Event()

    async def use(name: str, oldest: float, hold: asyncio.Event | None = None) -> None:
        async with turns.turn(lambda: oldest):
            order.append(name)
            if hold is not None:
                await hold.wait()

    holder = asyncio.create_task(use("holder", 0.0, holder_may_leave))
    await asyncio.sleep(0)
    young = asyncio.create_task(use("young", 5.0))  # asks first, but its item is younger
    await asyncio.sleep(0)
    old = asyncio.create_task(use("old", 1.0))
    await asyncio.sleep(0)
    holder_may_leave.set()
    await asyncio.gather(holder, young, old)
    assert order == ["holder", "old", "young"]


async def test_a_waiter_cancelled_while_waiting_does_not_keep_the_device():
    turns = DeviceTurns()
    release = asyncio.Event()
    ran: list[str] = []

    async def use(name: str, hold: asyncio.Event | None = None) -> None:
        async with turns.turn(lambda: 0.0):
            ran.append(name)
            if hold is not None:
                await hold.wait()

    holder = asyncio.create_task(use("holder", release))
    await asyncio.sleep(0)
    quitter = asyncio.create_task(use("quitter"))
    await asyncio.sleep(0)
    quitter.cancel()
    release.set()
    await holder
    await asyncio.wait_for(use("later"), 1)  # the device is free again
    assert ran == ["holder", "later"]


async def test_a_device_with_two_slots_holds_two_turns_and_queues_the_third_by_age():
    turns = DeviceTurns(slots=2)
    holding: set[str] = set()
    most_at_once = 0
    order: list[str] = []
    leave = {name: asyncio.Event() for name in ("a", "b", "young", "old")}

    async def use(name: str, oldest: float) -> None:
        nonlocal most_at_once
        async with turns.turn(lambda: oldest):
            order.append(name)
            holding.add(name)
            most_at_once = max(most_at_once, len(holding))
            await leave[name].wait()
            holding.discard(name)

    tasks = [asyncio.create_task(use(n, t)) for n, t in (("a", 0), ("b", 0), ("young", 9))]
    await asyncio.sleep(0)
    tasks.append(asyncio.create_task(use("old", 1)))
    await asyncio.sleep(0)
    assert holding == {"a", "b"}  # both slots taken; the other two wait
    leave["a"].set()
    await asyncio.sleep(0.01)
    assert holding == {"b", "old"}  # the freed slot went to the oldest waiter
    for event in leave.values():
        event.set()
    await asyncio.gather(*tasks)
    assert order == ["a", "b", "old", "young"] and most_at_once == 2


async def test_a_freed_slot_goes_to_pending_work_then_to_a_spare_turn_then_to_the_idle():
    turns = DeviceTurns(slots=2)
    order: list[str] = []
    leave = {name: asyncio.Event() for name in ("a", "b", "spare", "pending", "idle")}

    async def use(name: str, oldest: float | None) -> None:
        nobody_else = lambda: False  # noqa: E731  # no other batcher expects work
        turn = turns.spare_turn(nobody_else) if oldest is None else turns.turn(lambda: oldest)
        async with turn:
            order.append(name)
            await leave[name].wait()

    tasks = [asyncio.create_task(use(n, 0.0)) for n in ("a", "b")]
    await asyncio.sleep(0)
    tasks.append(asyncio.create_task(use("idle", math.inf)))  # a batcher with nothing pending
    tasks.append(asyncio.create_task(use("spare", None)))
    await asyncio.sleep(0)
    tasks.append(asyncio.create_task(use("pending", 5.0)))  # asks last, holds pending items
    await asyncio.sleep(0)
    for name in ("a", "b", "pending", "spare", "idle"):
        leave[name].set()
        await asyncio.sleep(0.01)
    await asyncio.gather(*tasks)
    assert order == ["a", "b", "pending", "spare", "idle"]


async def test_a_spare_turn_leaves_a_slot_to_another_batchers_expected_work():
    turns = DeviceTurns(slots=2)
    other_expects_work = False
    others = turns.join(lambda: False)  # the spare's own batcher
    turns.join(lambda: other_expects_work)  # another model's batcher
    got_spare = asyncio.Event()

    async def spare() -> None:
        async with turns.spare_turn(others):
            got_spare.set()

    async with turns.turn(lambda: 0.0):
        other_expects_work = True  # its items are being tokenised
        task = asyncio.create_task(spare())
        await asyncio.sleep(0.01)
        assert not got_spare.is_set()  # a slot is free, but it is kept for that work
        async with asyncio.timeout(1), turns.turn(lambda: 1.0):
            pass  # the other batcher takes the free slot at once when its items arrive
        await asyncio.sleep(0.01)
        assert not got_spare.is_set()  # still expected work (more on its way): kept free
        other_expects_work = False
    # The held turn is released with nobody else expecting work: the spare gets it.
    async with asyncio.timeout(1):
        await got_spare.wait()
    await task


async def test_a_spare_turn_takes_a_free_slot_at_once_when_no_other_work_is_expected():
    turns = DeviceTurns(slots=2)
    others = turns.join(lambda: False)
    async with turns.turn(lambda: 0.0), asyncio.timeout(1), turns.spare_turn(others):
        pass


async def test_a_waiter_cancelled_just_as_it_is_granted_passes_the_turn_on():
    turns = DeviceTurns()
    leave = {name: asyncio.Event() for name in ("holder", "first")}

    async def use(name: str, oldest: float) -> None:
        async with turns.turn(lambda: oldest):
            if name in leave:
                await leave[name].wait()

    holder = asyncio.create_task(use("holder", 0.0))
    await asyncio.sleep(0)
    first = asyncio.create_task(use("first", 1.0))
    second = asyncio.create_task(use("second", 2.0))
    await asyncio.sleep(0)
    leave["holder"].set()
    await holder  # the turn went to "first"
    leave["first"].set()
    await asyncio.sleep(0)
    while not first.done():  # "first" leaves; the turn is granted to "second" ...
        await asyncio.sleep(0)
    second.cancel()  # ... which is cancelled before it could run
    with contextlib.suppress(asyncio.CancelledError):
        await second
    async with asyncio.timeout(1), turns.turn(lambda: 3.0):
        pass  # the turn was passed on, not kept by the cancelled waiter


async def test_a_slot_kept_for_expected_work_goes_to_a_spare_once_that_work_is_withdrawn():
    turns = DeviceTurns(slots=2)
    other_expects_work = True  # another model's items are being tokenised
    others = turns.join(lambda: False)
    turns.join(lambda: other_expects_work)
    got_spare = asyncio.Event()

    async def spare() -> None:
        async with turns.spare_turn(others):
            got_spare.set()

    async with turns.turn(lambda: 0.0):  # held throughout: no release wakes the spare
        task = asyncio.create_task(spare())
        await asyncio.sleep(0.01)
        assert not got_spare.is_set()  # the free slot is kept for the expected work
        other_expects_work = False  # its caller left: the work will not come
        turns.expected_work_withdrawn()
        async with asyncio.timeout(1):
            await got_spare.wait()
        await task


async def test_a_free_slot_is_taken_without_waiting_and_handed_on_when_given_back():
    turns = DeviceTurns(slots=2)
    assert turns.take_free_slot()  # one free: taken at once
    async with turns.turn(lambda: 0.0):
        assert not turns.take_free_slot()  # both taken: no waiting, just no
        waiter_got_it = asyncio.Event()

        async def waiter() -> None:
            async with turns.turn(lambda: 0.0):
                waiter_got_it.set()

        task = asyncio.create_task(waiter())
        await asyncio.sleep(0)
        assert not waiter_got_it.is_set()
        turns.release_slot()  # handed to the waiting batcher
        await asyncio.wait_for(waiter_got_it.wait(), 1)
        await task
    assert turns.take_free_slot() and turns.take_free_slot()  # both free again
    assert not turns.take_free_slot()
