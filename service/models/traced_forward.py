"""A packed forward traced into one TorchScript graph, so that it runs without the GIL.

Eager PyTorch takes the GIL back between every operator of a forward. Beside a thread
running Python (the event loop parsing JSON and batching, the tokenizer threads), an
eager forward waits for the GIL at each of its hundreds of operators, up to the
interpreter's switch interval each time. Measured on a 2-core CPU, a MiniLM forward of 16
packed rows ran 4.5x slower beside a thread spinning in Python than alone (0.33 against
1.5 forwards/s); traced, 1.33 to 1.67 beside it: a traced graph runs from one C++ call
that lets go of the GIL throughout.

Traced only where the inputs fix the graph's control flow: packed rows (a 4-D mask and
explicit position ids), never right-padded rows, whose 2-D mask transformers may drop when
it is all ones, a branch a trace would freeze for every later batch. A trace records one
batch's operators; whether it holds for every other shape is checked at load against the
eager forward on layouts of other widths and bin counts, and a model that fails the check
stays eager.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence

import torch

from service.models.row_packing import PackedBatch, PackedLayout, pack_to_width

log = logging.getLogger(__name__)

# (B, W, H) hidden states of a packed batch.
PackedHidden = Callable[[PackedBatch], torch.Tensor]


def probe_batches(
    rows: Sequence[Sequence[int]],
    build: Callable[[Sequence[Sequence[int]], PackedLayout], PackedBatch],
) -> list[PackedBatch]:
    """Packed batches of three shapes from the same rows: in bins as wide as the longest
    row (several bins, padding: the trace is taken on this one, whose mask hides tokens),
    all in one bin, and the first row alone (a mask that hides nothing)."""
    lengths = [len(row) for row in rows]
    return [
        build(rows, pack_to_width(lengths, max(lengths))),
        build(rows, pack_to_width(lengths, sum(lengths))),
        build(rows[:1], pack_to_width(lengths[:1], lengths[0])),
    ]


def _tensors(packed: PackedBatch) -> tuple[torch.Tensor, ...]:
    return (
        packed.input_ids,
        packed.position_ids,
        packed.attention_mask,
        packed.row_of_token,
        packed.row_start,
    )


class _ByTensors(torch.nn.Module):
    """`hidden` as a module of plain tensors, holding the model whose weights it reads: the
    trace keeps them as the model's parameters, not as copies frozen into the graph."""

    def __init__(self, model: torch.nn.Module, hidden: PackedHidden) -> None:
        super().__init__()
        self.model = model
        self._hidden = hidden

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        return self._hidden(PackedBatch(*tensors))


def traced_hidden(
    model: torch.nn.Module,
    hidden: PackedHidden,
    probes: Sequence[PackedBatch],
    tolerance: float,
) -> PackedHidden | None:
    """`hidden` (a forward of `model`) traced on the first probe, or None where tracing
    fails or the traced graph differs from `hidden` on any probe by more than `tolerance`
    (relative to outputs larger than 1). Give probes of different shapes: a shape frozen
    into the trace shows there."""
    try:
        with warnings.catch_warnings(), torch.no_grad():
            # torch.jit.trace is deprecated for torch.export, which has no GIL-free runner
            # in Python; TracerWarnings name shape reads, which the probes check.
            warnings.simplefilter("ignore")
            graph = torch.jit.trace(
                _ByTensors(model, hidden), _tensors(probes[0]), check_trace=False
            )
            errors = []
            for probe in probes:
                expected, got = hidden(probe), graph(*_tensors(probe))
                scale = max(1.0, float(expected.abs().max()))
                errors.append(float((got - expected).abs().max()) / scale)
    except Exception as exc:  # tracers and encoders raise no common base
        log.warning("forward left eager: tracing failed (%s)", str(exc).splitlines()[0])
        return None
    if max(errors) > tolerance:
        log.warning("forward left eager: the traced graph differs from eager (%s)", errors)
        return None

    def traced(packed: PackedBatch) -> torch.Tensor:
        return graph(*_tensors(packed))

    return traced
