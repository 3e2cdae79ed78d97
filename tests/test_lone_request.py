"""A single-item request on an idle engine: tokenised and run in its device threads.

The engine on the tiny config: three device models (holistic, factuality, completeness) on
two CPU slots and a host rule. Every pool call is recorded by the function it was handed,
so a test sees which path each model's work took.
"""

import asyncio
import threading

import pytest
from prometheus_client import CollectorRegistry

from service.config import RewardConfig
from service.engine import RewardEngine, ScoreInput
from service.errors import ModelFailure
from service.metrics import ServiceMetrics
from service.models import load_models
from tests.conftest import tiny_config_dict
from tests.test_coalesced_calls import PoisonedEncoder

ITEM = ScoreInput("Who wrote Hamlet?", "Shakespeare wrote it around 1600.")
OTHERS = [
    ScoreInput("Where is Paris?", "In France, on the Seine, a long way from the sea."),
    ScoreInput("Who?", "Nobody."),
]
DEVICE_MODELS = {"holistic", "factuality", "completeness"}
MODELS = sorted(DEVICE_MODELS)
ENCODED = "alarm_encoded_texts_total"


class RecordedEngine:
    """An engine on the tiny config whose pools record the calls they are handed."""

    def __init__(self, tiny_paths, tmp_path, **batching) -> None:
        sections = {"cache": {"max_items": 0}}
        config_dict = tiny_config_dict(tiny_paths, **sections)
        config_dict["batching"].update(batching)
        config = RewardConfig.model_validate(config_dict)
        self.registry = CollectorRegistry()
        self.models = {model.name: model for model in load_models(config, tmp_path)}
        self.engine = RewardEngine(
            list(self.models.values()), config, ServiceMetrics(self.registry)
        )
        self.alone: list[str] = []  # models whose item went straight to a device thread
        self.batched: list[list[str]] = []  # models in each call to the tokenizer threads
        self._record(self.engine._device_pools["cpu"], self._on_device)
        self._record(self.engine._tokenize_pool, self._on_tokenizer)

    @staticmethod
    def _record(pool, note) -> None:
        run = pool.run

        def recording(function, *args):
            note(function.__name__, args)
            return run(function, *args)

        pool.run = recording

    def _on_device(self, name: str, args) -> None:
        if name == "prepare_and_run":
            self.alone.append(args[0].name)

    def _on_tokenizer(self, name: str, args) -> None:
        if name == "_prepare_together":
            self.batched.append(sorted(model.name for model, _ in args[0]))

    def clear(self) -> None:
        self.alone.clear()
        self.batched.clear()

    def sample(self, name: str, model: str) -> float:
        return self.registry.get_sample_value(name, {"model": model}) or 0.0

    @property
    def slots_in_use(self) -> int:
        return self.engine._device_turns["cpu"]._in_use


@pytest.fixture
async def recorded(tiny_paths, tmp_path):
    recorded = RecordedEngine(tiny_paths, tmp_path)
    await recorded.engine.start()
    recorded.clear()
    yield recorded
    await recorded.engine.stop()


async def test_a_lone_item_runs_in_device_threads_on_the_free_slots_and_scores_as_in_a_batch(
    recorded,
):
    """Two slots: two device models take the item straight to a slot each, the third goes
    through the tokenizer thread and its batcher; the reward is the one the item gets in a
    padded batch with other items."""
    (alone,) = await recorded.engine.score([ITEM])
    assert len(recorded.alone) == 2
    assert set(recorded.alone) < DEVICE_MODELS
    assert recorded.batched == [sorted(DEVICE_MODELS - set(recorded.alone))]
    recorded.clear()
    in_batch = (await recorded.engine.score([*OTHERS, ITEM]))[-1]
    assert recorded.alone == []
    assert alone.combined.reward == pytest.approx(in_batch.combined.reward, abs=1e-5)
    assert alone.combined.holistic_raw == pytest.approx(in_batch.combined.holistic_raw, abs=1e-5)
    for name, aspect in alone.combined.aspects.items():
        assert aspect.value == pytest.approx(in_batch.combined.aspects[name].value, abs=1e-5)
    assert recorded.slots_in_use == 0


async def test_requests_arriving_together_still_share_their_batches(recorded):
    """Two single-item requests in one turn of the event loop: neither is alone, so every
    device model's inputs of both are tokenised in one call and batched together."""
    before = {name: recorded.sample("alarm_batch_size_items_sum", name) for name in DEVICE_MODELS}
    await asyncio.gather(recorded.engine.score([ITEM]), recorded.engine.score([OTHERS[0]]))
    assert recorded.alone == []
    assert recorded.batched == [sorted(list(DEVICE_MODELS) * 2)]
    for name in DEVICE_MODELS:
        assert recorded.sample("alarm_batch_size_items_sum", name) - before[name] == 2


async def test_a_lone_run_is_reported_as_a_batch_of_one_with_its_encodings(recorded):
    batches = {
        name: recorded.sample("alarm_batch_size_items_count", name) for name in DEVICE_MODELS
    }
    scored = {name: recorded.sample("alarm_items_scored_total", name) for name in DEVICE_MODELS}
    encoded = recorded.registry.get_sample_value(
        "alarm_encoded_texts_total", {"outcome": "encoded"}
    )
    await recorded.engine.score([ITEM])
    assert len(recorded.alone) == 2
    for name in recorded.alone:
        assert recorded.sample("alarm_batch_size_items_count", name) == batches[name] + 1
        assert recorded.sample("alarm_batch_size_items_sum", name) > 0
        assert recorded.sample("alarm_items_scored_total", name) == scored[name] + 1
        assert recorded.sample("alarm_batch_padded_tokens_sum", name) > 0
    after = recorded.registry.get_sample_value(ENCODED, {"outcome": "encoded"})
    assert after > encoded  # the device threads' tokenising is counted too


async def test_a_text_that_fails_to_tokenise_alone_fails_its_request_and_frees_the_slot(recorded):
    holistic = recorded.models["holistic"]
    shared = holistic._shared_tokenizer
    clean_encoder = shared.encoder
    shared.encoder = PoisonedEncoder(clean_encoder)
    with pytest.raises(ModelFailure, match="could not tokenise"):
        await recorded.engine.score([ScoreInput("Who wrote it?", "A POISON answer.")])
    assert "holistic" in recorded.alone
    assert recorded.slots_in_use == 0
    shared.encoder = clean_encoder
    (scored,) = await recorded.engine.score([ITEM])
    assert scored.combined.reward == scored.combined.reward  # a number, not NaN


async def test_a_forward_that_fails_alone_fails_its_request_and_counts_a_failed_batch(recorded):
    holistic = recorded.models["holistic"]
    failures = recorded.sample("alarm_batch_failures_total", "holistic")

    def broken(batch):
        raise RuntimeError("the device fell over")

    object.__setattr__(holistic, "run", broken)
    with pytest.raises(ModelFailure, match="failed on this batch"):
        await recorded.engine.score([ITEM])
    assert "holistic" in recorded.alone
    assert recorded.sample("alarm_batch_failures_total", "holistic") == failures + 1
    assert recorded.slots_in_use == 0


async def test_a_caller_that_leaves_during_a_lone_forward_holds_the_slot_until_it_ends(recorded):
    """The forward cannot be stopped once it runs: its slot stays taken until it ends, so
    that no other forward starts on a device whose slots are all busy."""
    holistic = recorded.models["holistic"]
    run = holistic.run
    started, release = threading.Event(), threading.Event()

    def held(batch):
        started.set()
        release.wait(10)
        return run(batch)

    object.__setattr__(holistic, "run", held)
    task = asyncio.create_task(recorded.engine.score([ITEM]))
    assert await asyncio.to_thread(started.wait, 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert "holistic" in recorded.alone
    for _ in range(500):  # the request's other forwards end, or are dropped
        if recorded.slots_in_use <= 1:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.1)
    assert recorded.slots_in_use == 1  # the holistic forward still runs, on its slot
    object.__setattr__(holistic, "run", run)
    release.set()
    for _ in range(200):
        if recorded.slots_in_use == 0:
            break
        await asyncio.sleep(0.01)
    assert recorded.slots_in_use == 0
    assert len(await recorded.engine.score([ITEM])) == 1


async def test_a_configured_fill_wait_keeps_every_item_on_its_batcher(tiny_paths, tmp_path):
    """`fill_wait_ms` asks a batch to wait for company: no item skips its batcher then."""
    recorded = RecordedEngine(tiny_paths, tmp_path, fill_wait_ms=1.0)
    await recorded.engine.start()
    try:
        recorded.clear()
        await recorded.engine.score([ITEM])
    finally:
        await recorded.engine.stop()
    assert recorded.alone == []
    assert recorded.batched == [sorted(DEVICE_MODELS)]


async def test_after_items_that_came_together_a_lone_item_keeps_its_batcher_for_one_spell(
    recorded,
):
    """Closed-loop clients that send together empty the engine between rounds and come back
    one by one: the first of a round must not run alone while the rest wait for its slots.
    Only once a whole busy spell held one item at a time does a lone item skip its batcher."""
    await asyncio.gather(recorded.engine.score([ITEM]), recorded.engine.score([OTHERS[0]]))
    recorded.clear()
    await recorded.engine.score([ITEM])
    assert recorded.alone == []
    await recorded.engine.score([ITEM])
    assert len(recorded.alone) == 2


def test_admission_tells_items_that_come_one_at_a_time_from_items_that_come_together():
    from service.admission import Admission
    from service.config import LimitsConfig

    admission = Admission(100, LimitsConfig(), ServiceMetrics(CollectorRegistry()))
    assert admission.one_at_a_time
    admission.admit("a", 1)
    assert admission.one_at_a_time
    admission.admit("b", 1)  # two in flight: a round of clients sending together
    admission.release("a", 1)
    assert not admission.one_at_a_time
    admission.release("b", 1)  # empty: the spell that peaked at two is the last one now
    admission.admit("a", 1)
    assert not admission.one_at_a_time
    admission.release("a", 1)  # a spell of one item at a time
    admission.admit("a", 1)
    assert admission.one_at_a_time
    admission.release("a", 1)
    admission.admit("a", 2)  # one request of two items
    assert not admission.one_at_a_time


async def test_an_engine_that_stops_accepting_sends_no_item_alone(recorded):
    """While the engine stops, its device threads may be gone: work goes to the batchers,
    which fail it as the service stopping (503), and no slot is taken."""
    recorded.engine._accepting = False
    try:
        assert not recorded.engine._runs_alone(recorded.models["holistic"], [ITEM])
    finally:
        recorded.engine._accepting = True
    assert recorded.slots_in_use == 0
