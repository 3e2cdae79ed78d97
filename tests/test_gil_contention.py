"""`benchmarks/gil_contention.py`: a forward alone and beside a thread running Python."""

import sys
import threading

import pytest

from benchmarks.gil_contention import measure_contention, ops_from_python, python_spinning
from benchmarks.workload import load_items
from service.models import EncodingMemo
from tests.test_models import llama_holistic, load_holistic


def test_each_batch_size_is_timed_alone_and_beside_python_with_its_ops_counted(
    tiny_paths, tmp_path
):
    model = load_holistic(llama_holistic(tiny_paths), tmp_path)
    items = load_items(8)
    figures = measure_contention(model, items, sizes=(1, 4), repeats=2)
    assert [(f.model, f.device, f.items) for f in figures] == [("h", "cpu", 1), ("h", "cpu", 4)]
    for f in figures:
        assert f.alone_ms > 0 and f.beside_ms > 0
        assert f.ratio == pytest.approx(f.beside_ms / f.alone_ms)
    batch = [model.prepare(i["prompt"], i["response"], EncodingMemo()) for i in items[:4]]
    assert figures[1].ops_from_python == ops_from_python(model, batch) > 0


def test_python_spins_beside_the_block_at_the_interval_asked_for_then_stops():
    before = sys.getswitchinterval()
    with python_spinning(0.0005):
        assert sys.getswitchinterval() == pytest.approx(0.0005)
        assert "python_spinning" in [thread.name for thread in threading.enumerate()]
    assert sys.getswitchinterval() == before
    assert "python_spinning" not in [thread.name for thread in threading.enumerate()]
    with python_spinning(None):
        assert sys.getswitchinterval() == before
