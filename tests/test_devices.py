"""Every tensor adapter on every device and dtype at hand: CPU always, CUDA where visible.

A GPU runs other kernels than the CPU, chosen by shape, and bf16 rounds every product; the
scores must still not depend on which batch an item lands in, and must match the CPU's
float32 scores to the dtype's precision. Run on a GPU machine with `pytest
tests/test_devices.py`; on a CPU-only machine the CPU half runs.
"""

from pathlib import Path
from typing import Any

import pytest
import torch

from service.models import AspectScore, EncodingMemo, HolisticScore
from service.models.packaged import MINILM, PACKAGED_PREFIX
from tests.test_models import PROMPT, RESPONSES, load_aspect, load_holistic

DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
# (alone vs batched, device+dtype vs CPU float32): float32 to summation order, bf16 to
# its 8-bit mantissa (relative 2^-8 per rounding, a few roundings deep).
TOLERANCES = {"float32": (1e-4, 1e-3), "bfloat16": (2e-2, 5e-2)}

SPECS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama_rm": ("holistic", {"kind": "sequence_scalar"}),
    "deberta_rm": ("holistic", {"kind": "sequence_scalar"}),
    "causal_lm": ("holistic", {"kind": "lm_likelihood"}),
    "segment": ("aspect", {"kind": "segment_classifier"}),
    "minilm": ("aspect", {"kind": "embedding_similarity", "max_length": 128}),
}

# Models whose batches are packed end to end: packed on every device and dtype.
PACKING = {"llama_rm", "deberta_rm", "minilm"}


def _load(which: str, device: str, dtype: str, paths, tmp_path: Path):
    role, extra = SPECS[which]
    path = PACKAGED_PREFIX + MINILM if which == "minilm" else str(paths[which])
    spec = {"name": which, "path": path, "device": device, "dtype": dtype, **extra}
    return (
        load_holistic(spec, tmp_path) if role == "holistic" else load_aspect(spec, paths, tmp_path)
    )


def _raws(score: HolisticScore | AspectScore) -> list[float | None]:
    if isinstance(score, HolisticScore):
        return [score.raw]
    return [s.raw for s in score.segments]


def _assert_close(got: list[float | None], want: list[float | None], tolerance: float) -> None:
    assert [g is None for g in got] == [w is None for w in want]
    pairs = [(g, w) for g, w in zip(got, want, strict=True) if g is not None and w is not None]
    assert [g for g, _ in pairs] == pytest.approx(
        [w for _, w in pairs], rel=tolerance, abs=tolerance
    )


@pytest.mark.parametrize("which", list(SPECS))
@pytest.mark.parametrize("dtype", list(TOLERANCES))
@pytest.mark.parametrize("device", DEVICES)
def test_scores_do_not_depend_on_the_batch_and_match_cpu_float32(
    device, dtype, which, tiny_paths, tmp_path
):
    model = _load(which, device, dtype, tiny_paths, tmp_path)
    reference = _load(which, "cpu", "float32", tiny_paths, tmp_path)
    assert model.device.startswith(device)
    if which in PACKING:
        assert model.packs_rows  # the load check passed on this device and dtype
    batch_tolerance, reference_tolerance = TOLERANCES[dtype]
    memo = EncodingMemo()
    prepared = [model.prepare(PROMPT, r, memo) for r in RESPONSES]
    together = model.run(prepared)
    expected = reference.run([reference.prepare(PROMPT, r, EncodingMemo()) for r in RESPONSES])
    for item, in_batch, want in zip(prepared, together, expected, strict=True):
        (alone,) = model.run([item])
        if which == "segment":
            # The same sentences in every dtype; their labels (an argmax of logits, which
            # bf16 may flip near a tie) equal in float32.
            spans = [
                [(s.start, s.end) for s in score.segments] for score in (in_batch, alone, want)
            ]
            assert spans[0] == spans[1] == spans[2]
            if dtype == "float32":
                assert _raws(in_batch) == _raws(alone) == _raws(want)
            continue
        _assert_close(_raws(in_batch), _raws(alone), batch_tolerance)
        _assert_close(_raws(alone), _raws(want), reference_tolerance)


class _PlacedAnywhere(torch.nn.Linear):
    """A model that "moves" to any device: loading onto CUDA, checked without one."""

    def to(self, *args: Any, **kwargs: Any) -> "_PlacedAnywhere":
        return self


class _AutoPlacedAnywhere:
    @staticmethod
    def from_pretrained(path: str, dtype: torch.dtype) -> _PlacedAnywhere:
        return _PlacedAnywhere(2, 1, dtype=dtype)


@pytest.fixture
def cudnn_attention_restored():
    enabled = torch.backends.cuda.cudnn_sdp_enabled()
    yield
    torch.backends.cuda.enable_cudnn_sdp(enabled)


@pytest.mark.parametrize(("device", "cudnn_after"), [("cpu", True), ("cuda:0", False)])
def test_a_model_loaded_onto_a_gpu_attends_without_cudnn_shape_plans(
    device, cudnn_after, cudnn_attention_restored
):
    from service.models.loading import load_pretrained

    torch.backends.cuda.enable_cudnn_sdp(True)
    load_pretrained(_AutoPlacedAnywhere, "any", "float32", device)
    assert torch.backends.cuda.cudnn_sdp_enabled() is cudnn_after
