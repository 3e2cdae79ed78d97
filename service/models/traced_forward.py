"""A packed forward traced into one TorchScript graph, so that it runs without the GIL.

Eager PyTorch takes the GIL back between every operator of a forward. Beside a thread
running Python (the event loop parsing JSON and batching, the tokenizer threads), an
eager forward waits for the GIL at each of its hundreds of operators, up to the
interpreter's switch interval each time. Measured on a 2-core CPU (MiniLM, 16 packed rows,
one torch thread, 3 s windows): 1 eager forward beside a thread spinning in Python against
4 to 5 alone; traced, 4 to 5 beside it. A traced graph runs from one C++ call that lets go
of the GIL throughout. What a model traces starts from the host's arrays on the device
(`packed_tokens`' tokens, and for the scalar RMs and embeddings one cell per row) and takes
in the mask: the scalar RMs' graph ends with each row's score (the head inside), the
embedding model's with its embeddings and cosines, so that only the copies, the call and
the read-back remain as calls from Python, each a hand-over of the GIL that may wait for
it. The LM's graph ends with the hidden states; its head runs after.

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
from typing import Any

import torch

from service.models.row_packing import PackedLayout, pack_to_width

log = logging.getLogger(__name__)

# A packed forward: the device's copies of `packed_tokens`' arrays (and whatever else a
# model reads per row) to one output per row, or (B, W, H) hidden states; or a tuple of
# such tensors.
PackedForward = Callable[..., Any]
PackedInputs = tuple[torch.Tensor, ...]


def probe_batches(
    rows: Sequence[Sequence[int]],
    build: Callable[[Sequence[Sequence[int]], PackedLayout], PackedInputs],
) -> list[PackedInputs]:
    """Packed inputs of four shapes from the same rows: in bins as wide as the longest
    row (several bins, padding: the trace is taken on this one, whose mask hides tokens),
    all in one bin, the first row alone (a mask that hides nothing), and every row three
    times over (more rows and bins than the trace saw)."""
    lengths = [len(row) for row in rows]
    tripled = [*rows, *rows, *rows]
    return [
        build(rows, pack_to_width(lengths, max(lengths))),
        build(rows, pack_to_width(lengths, sum(lengths))),
        build(rows[:1], pack_to_width(lengths[:1], lengths[0])),
        build(tripled, pack_to_width(lengths * 3, max(lengths))),
    ]


class _PackedForwardModule(torch.nn.Module):
    """`forward` as a module, holding the model whose weights it reads: the trace keeps
    them as the model's parameters, not as copies frozen into the graph."""

    def __init__(self, model: torch.nn.Module, forward: PackedForward) -> None:
        super().__init__()
        self.model = model
        self._forward = forward

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        return self._forward(*tensors)


# Each probe runs this many times and the last output counts: TorchScript's executor
# profiles a graph's first runs and then runs an optimised plan (fused kernels on a GPU).
PROBE_PASSES = 3


def _grows_rope_with_length(model_config: object) -> bool:
    """Dynamic RoPE rescales its frequencies once a row outgrows the cached length: a
    branch on the data that no probe of short rows would cross."""
    for field in ("rope_parameters", "rope_scaling"):
        parameters = getattr(model_config, field, None)
        if isinstance(parameters, dict) and "dynamic" in str(parameters.get("rope_type", "")):
            return True
    return False


def traced_forward(
    model: torch.nn.Module,
    forward: PackedForward,
    probes: Sequence[PackedInputs],
    tolerance: float,
) -> PackedForward | None:
    """`forward` (of `model`) traced on the first probe, or None where tracing fails,
    where the graph would call back into Python (and so take the GIL), or where it differs
    from `forward` on any probe by more than `tolerance` (relative to outputs larger than
    1). Give probes of different shapes: a shape frozen into the trace shows there."""
    if _grows_rope_with_length(getattr(model, "config", None)):
        log.warning("forward left eager: dynamic RoPE branches on the row length")
        return None
    try:
        with warnings.catch_warnings(), torch.no_grad():
            # torch.jit.trace is deprecated for torch.export, which has no GIL-free runner
            # in Python. TracerWarnings name every shape read and every Python value taken
            # from a tensor, harmless ones among them: the probes check the outputs instead.
            warnings.simplefilter("ignore")
            graph = torch.jit.trace(
                _PackedForwardModule(model, forward), probes[0], check_trace=False
            )
            if graph.inlined_graph.findAllNodes("prim::PythonOp"):
                log.warning("forward left eager: the traced graph calls back into Python")
                return None
            errors = []
            for probe in probes:
                expected = _outputs(forward(*probe))
                for _ in range(PROBE_PASSES):
                    got = _outputs(graph(*probe))
                if len(got) != len(expected):
                    raise ValueError(f"{len(got)} outputs traced, {len(expected)} eager")
                for got_one, expected_one in zip(got, expected, strict=True):
                    if got_one.shape != expected_one.shape:  # a shape frozen in the trace
                        raise ValueError(
                            f"shape {tuple(got_one.shape)} traced, eager "
                            f"{tuple(expected_one.shape)}"
                        )
                    scale = max(1.0, float(expected_one.abs().max()))
                    errors.append(float((got_one - expected_one).abs().max()) / scale)
    except Exception as exc:  # tracers and encoders raise no common base
        first_line = (str(exc).splitlines() or [""])[0]  # not the tensors some messages print
        log.warning("forward left eager: tracing failed (%s: %s)", type(exc).__name__, first_line)
        return None
    if not all(error <= tolerance for error in errors):  # a NaN fails too
        log.warning("forward left eager: the traced graph differs from eager (%s)", errors)
        return None

    def traced(*tensors: torch.Tensor) -> Any:
        return graph(*tensors)

    return traced


def _outputs(output: torch.Tensor | tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return output if isinstance(output, tuple) else (output,)
