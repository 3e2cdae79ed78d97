"""Packed forwards traced into one TorchScript graph: the same scores as eager on every
shape, eager where a trace would freeze a branch, and no GIL held while the graph runs."""

import logging
import os
import sys
import threading
import time
import types

import pytest
import torch

from benchmarks.workload import load_items
from service.config import RewardConfig
from service.models import EncodingMemo, load_models, prepare_items
from service.models.packaged import MINILM, PACKAGED_PREFIX, SMOLLM2
from service.models.row_packing import PackedBatch, PackedLayout, pack_to_width, packed_tokens
from service.models.traced_forward import PackedInputs, probe_batches, traced_forward
from tests.test_packed_heads import _holistic, _raw, _short_items
from tests.test_row_packing import _cosines, _relevance


@pytest.mark.parametrize("family", ["llama", "deberta", "bert", "roberta"])
def test_a_traced_scalar_rm_scores_every_batch_as_its_eager_forward(family, scalar_rms, tmp_path):
    traced = _holistic(scalar_rms[family], tmp_path)
    eager = _holistic(scalar_rms[family], tmp_path, trace_packed=False)
    assert traced.describe()["traced"] and not eager.describe()["traced"]
    assert eager.describe()["packs_rows"]  # both run packed: only the way of running differs
    assert traced.fingerprint == eager.fingerprint
    memo = EncodingMemo()
    prepared = [traced.prepare(p, r, memo) for p, r in _short_items(30)]
    for size in (1, 2, 7, 30):  # bin counts and widths the load check never saw
        for start in range(0, 30, size):
            batch = prepared[start : start + size]
            assert _raw(traced, batch) == pytest.approx(_raw(eager, batch), rel=1e-5, abs=1e-6)


def test_minilm_traced_embeds_qa_feedback_as_eager(tiny_paths, tmp_path):
    path = PACKAGED_PREFIX + MINILM
    traced = _relevance(path, tiny_paths, tmp_path)
    eager = _relevance(path, tiny_paths, tmp_path, trace_packed=False)
    assert traced.describe()["traced"] and not eager.describe()["traced"]
    items = load_items(24)
    prepared = [traced.prepare(i["prompt"], i["response"], EncodingMemo()) for i in items]
    for size in (1, 5, 24):
        for start in range(0, 24, size):
            batch = prepared[start : start + size]
            assert _cosines(traced, batch) == pytest.approx(_cosines(eager, batch), abs=1e-5)


def test_default_smollm2_likelihood_packed_and_traced_scores_qa_feedback_as_padded(tmp_path):
    """The embedded default's holistic model, on real weights: packed rows in one traced
    graph score as right-padded rows do."""
    spec = {
        "name": "likelihood",
        "kind": "lm_likelihood",
        "path": PACKAGED_PREFIX + SMOLLM2,
        "device": "cpu",
        "max_length": 512,
    }

    def load(pack_rows: bool):
        config = RewardConfig.model_validate({"holistic": {**spec, "pack_rows": pack_rows}})
        return load_models(config, tmp_path)[0]

    packed, padded = load(True), load(False)
    assert (packed.describe()["packs_rows"], packed.describe()["traced"]) == (True, True)
    items = [(i["prompt"], i["response"]) for i in load_items(8)]
    prepared = prepare_items(packed, items, EncodingMemo())
    for got, want in zip(packed.run(prepared), padded.run(prepared), strict=True):
        assert got.raw == pytest.approx(want.raw, abs=1e-4)


def test_compile_leaves_the_packed_forward_untraced(scalar_rms, tiny_paths, tmp_path, monkeypatch):
    for module in ("sequence_scalar", "embedding_similarity"):
        monkeypatch.setattr(f"service.models.{module}.compiled", lambda model, *_: model)
    assert not _holistic(scalar_rms["bert"], tmp_path, compile=True).describe()["traced"]
    relevance = _relevance(PACKAGED_PREFIX + MINILM, tiny_paths, tmp_path, compile=True)
    assert relevance.describe()["packs_rows"] and not relevance.describe()["traced"]


class _Embedder(torch.nn.Module):
    """A stand-in encoder: an embedding, then `layers` linear layers on every token."""

    def __init__(self, width: int = 32, layers: int = 2) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(300, width)
        self.layers = torch.nn.ModuleList(torch.nn.Linear(width, width) for _ in range(layers))

    def hidden(self, tokens: torch.Tensor, row_cells: torch.Tensor) -> torch.Tensor:
        """From the packed inputs, as the adapters' forwards start: the batch's tensors,
        its mask built from them."""
        packed = PackedBatch.on_device(tokens, row_cells, torch.bool, causal=False)
        x = self.embed(packed.input_ids) + packed.position_ids[..., None]
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x

    def shape_reading_hidden(self, tokens: torch.Tensor, row_cells: torch.Tensor) -> torch.Tensor:
        """Reads the width and the row count from shapes (as `_deberta_hidden` reads the row
        count): a trace must record the reads, not the traced batch's numbers."""
        packed = PackedBatch.on_device(tokens, row_cells, torch.bool, causal=False)
        real = packed.row_of_token.view(packed.input_ids.shape) < packed.row_cells.shape[0]
        return self.hidden(tokens, row_cells) * real[..., None] / packed.input_ids.shape[1]

    def branching_hidden(self, tokens: torch.Tensor, row_cells: torch.Tensor) -> torch.Tensor:
        """Another way when the mask hides nothing (transformers drops such a padding mask):
        a branch on the data, which a trace freezes the way its own batch went."""
        x = self.hidden(tokens, row_cells)
        mask = PackedBatch.on_device(tokens, row_cells, torch.bool, causal=False).attention_mask
        return x + 1.0 if bool(mask.all()) else x


def _rows(count: int, seed: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 40, (count,), generator=generator).tolist()
    return [torch.randint(3, 300, (n,), generator=generator).tolist() for n in lengths]


def _build(rows, layout: PackedLayout) -> PackedInputs:
    return tuple(map(torch.from_numpy, packed_tokens(rows, layout, 0, 0)))


def test_a_trace_reads_each_batch_shape_anew():
    model = _Embedder()
    forward = model.shape_reading_hidden
    traced = traced_forward(model, forward, probe_batches(_rows(5, 0), _build), 1e-5)
    assert traced is not None
    with torch.inference_mode():
        for count, seed in ((1, 1), (9, 2), (40, 3)):
            rows = _rows(count, seed)
            layout = pack_to_width([len(r) for r in rows], 64)
            batch = _build(rows, layout)
            assert torch.allclose(traced(*batch), forward(*batch), atol=1e-6)


def test_a_branch_on_the_data_leaves_the_forward_eager(caplog):
    model = _Embedder()
    probes = probe_batches(_rows(5, 0), _build)  # traced on the first: its mask hides tokens
    with caplog.at_level(logging.WARNING):
        assert traced_forward(model, model.branching_hidden, probes, 1e-5) is None
    assert "left eager" in caplog.text


@pytest.mark.parametrize("error", [ValueError("no 4-D masks here"), AssertionError()])
def test_a_trace_that_raises_leaves_the_forward_eager(error, caplog):
    model = _Embedder()

    def failing(*inputs: torch.Tensor) -> torch.Tensor:
        raise error

    with caplog.at_level(logging.WARNING):
        assert traced_forward(model, failing, probe_batches(_rows(5, 0), _build), 1e-5) is None
    assert type(error).__name__ in caplog.text and str(error) in caplog.text


def test_a_forward_that_gives_nan_stays_eager():
    model = _Embedder()

    def nan_hidden(*inputs: torch.Tensor) -> torch.Tensor:
        return model.hidden(*inputs) * torch.nan

    assert traced_forward(model, nan_hidden, probe_batches(_rows(5, 0), _build), 1e-5) is None


def test_dynamic_rope_leaves_the_forward_eager(caplog):
    model = _Embedder()
    model.config = types.SimpleNamespace(rope_parameters={"rope_type": "dynamic", "factor": 2.0})
    with caplog.at_level(logging.WARNING):
        assert traced_forward(model, model.hidden, probe_batches(_rows(5, 0), _build), 1e-5) is None
    assert "dynamic RoPE" in caplog.text


def _worker_cpu_sleeping_then_spinning(forward, batch: PackedInputs, window_s: float):
    """CPU seconds `forward` gets on its own thread while this thread first sleeps, then
    spins in Python with a switch interval longer than the spin, `window_s` each: an eager
    forward waits for the GIL between operators, a traced graph does not. The sleeping
    window is the yardstick of what the worker gets on this machine at this moment."""
    ready, clock = threading.Event(), []

    def work() -> None:
        torch.set_num_threads(1)  # every operator on this thread: its own clock sees it all
        clock.append(time.pthread_getcpuclockid(threading.get_ident()))
        ready.set()
        with torch.inference_mode():
            forward(*batch)

    interval, threads = sys.getswitchinterval(), torch.get_num_threads()
    worker = threading.Thread(target=work)
    try:
        sys.setswitchinterval(10 * window_s)
        worker.start()
        ready.wait()
        time.sleep(0.05)  # the worker is past `ready` and inside its forward
        start = time.clock_gettime(clock[0])
        time.sleep(window_s)
        slept = time.clock_gettime(clock[0])
        end = time.perf_counter() + window_s
        while time.perf_counter() < end:
            pass
        spun = time.clock_gettime(clock[0])
    finally:
        sys.setswitchinterval(interval)
        worker.join()
        torch.set_num_threads(threads)
    return slept - start, spun - slept


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs a core beside the spin")
def test_a_traced_forward_runs_while_python_holds_the_gil():
    model = _Embedder(width=256, layers=80)  # ~1 s of forward on one core
    traced = traced_forward(model, model.hidden, probe_batches(_rows(5, 0), _build), 1e-4)
    assert traced is not None
    rows = [[7] * 500 for _ in range(16)]
    batch = _build(rows, pack_to_width([500] * 16, 512))
    asleep, spinning = _worker_cpu_sleeping_then_spinning(traced, batch, 0.2)
    assert spinning > 0.5 * asleep
    asleep, spinning = _worker_cpu_sleeping_then_spinning(model.hidden, batch, 0.2)
    assert spinning < 0.25 * asleep
