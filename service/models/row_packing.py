"""Several short rows end to end in one row of a forward, each attending to itself only.

An item of an embedding aspect is a short prompt row and one row per sentence; an item of a
scalar RM is one row of every length. Padded into one rectangle, or cut into length-sorted
forwards, a batch of them wasted 7 to 30 % of its tokens on padding (0.70 to 0.93 real /
padded tokens on the benchmark's relevance items) or paid for several forward calls.
Packed, rows sit end to end in bins of one width: a block-diagonal attention mask (causal
within a row, for decoders) keeps every row to its own tokens and position ids restart at
each row, so each row's hidden states are those it has alone (to float rounding). Only for
models whose attention takes a 4-D mask and whose positions come from `position_ids` (or
from distances, as DeBERTa's): `packing_position_offset` finds out at load.
"""

from __future__ import annotations

import bisect
import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from service.models.loading import length_sorted_chunks, to_device

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PackedLayout:
    """Which rows share which bin, in order; every bin is `width` tokens wide."""

    width: int
    bins: tuple[tuple[int, ...], ...]

    @property
    def padded_tokens(self) -> int:
        return len(self.bins) * self.width


def attention_span(hidden_size: int) -> int:
    """Row width at which a token's attention costs as much as the rest of its layer.

    A token's linear layers cost ~24 x hidden^2 multiply-adds and its attention ~4 x hidden x
    width, so attention catches up at 6 x hidden tokens; softmax and masking are memory-bound
    and bring it nearer. Measured on all-MiniLM-L6-v2 (hidden 384) on a 2-core CPU: bins of
    256 and 512 tokens took 1.10x and 1.30x a bin of 128 per token, about 1,000 tokens."""
    return 3 * hidden_size


# Each try packs every row (~0.5 ms for 400 rows): a batch's layout costs a few ms at most.
MAX_WIDTHS_TRIED = 8

# No bin wider, unless one row is: a (bins, 1, W, W) mask and eager attention's scores grow
# with W^2, and decoders' positions tables (32k and more) would not bound it.
MAX_BIN_WIDTH = 1024


def max_bin_width(model_config: object, max_length: int) -> int:
    """Bins as wide as the positions table allows (BERT-like: a row's positions start
    over, but the table bounds each row), at most MAX_BIN_WIDTH."""
    return min(int(getattr(model_config, "max_position_embeddings", max_length)), MAX_BIN_WIDTH)


@functools.lru_cache(maxsize=256)
def pack(lengths: tuple[int, ...], span: int, max_width: int) -> PackedLayout:
    """The layout of least estimated cost: padded tokens x (1 + width / `span`).

    Cached: the batcher counts a batch's padded tokens (event loop) with the very layout
    its forward then uses (device thread). Widths tried, narrowest first: the longest row
    (no row is wider than the rectangle it would be padded to anyway), then the widths that
    would fill some number of bins exactly; wider bins save padding but cost attention, so
    a width whose best case cannot beat the cheapest so far ends the search. At most
    `max_width` (the encoder's positions table), unless one row is longer.
    """
    if not lengths:
        return PackedLayout(0, ())
    longest, total = max(lengths), sum(lengths)
    candidates = sorted(
        {longest} | {w for b in range(1, len(lengths) + 1) if longest <= (w := -(-total // b))}
    )
    best: tuple[float, PackedLayout] | None = None
    widths = [w for w in candidates if w <= max(longest, max_width)][:MAX_WIDTHS_TRIED]
    for width in widths:
        if best is not None and total * (1 + width / span) >= best[0]:
            break  # ascending widths: no wider bin can beat the best any more
        layout = pack_to_width(lengths, width)
        cost = layout.padded_tokens * (1 + layout.width / span)
        if best is None or cost < best[0]:
            best = (cost, layout)
    assert best is not None  # the longest row is always a candidate
    return best[1]


Forwards = tuple[tuple[tuple[int, ...], PackedLayout], ...]  # (rows, their layout) per forward


@functools.lru_cache(maxsize=256)
def packed_forwards(
    lengths: tuple[int, ...], span: int, max_width: int, overhead_tokens: int
) -> Forwards:
    """The forwards that run rows of these lengths: all packed in one, or cut shortest first
    where a forward call costs less than the padding it saves (`length_sorted_chunks`),
    each cut packed, whichever is estimated cheaper (a call: `overhead_tokens` + padded
    tokens x (1 + width / `span`)).

    One forward wins on mixed lengths; cuts win on a batch of like lengths (what a server
    sorting a thousand pending items hands over), which no single width packs tightly: on
    the benchmark's holistic rows, 0.95 real / padded tokens in one forward per 64 sorted
    rows against 0.99 cut. Cached like `pack`: the batcher and the forward share it.
    """
    whole = pack(lengths, span, max_width)
    chunks = length_sorted_chunks(lengths, overhead_tokens)
    if len(chunks) > 1:
        cut = tuple((tuple(c), pack(tuple(lengths[i] for i in c), span, max_width)) for c in chunks)
        if sum(_call_cost(layout, span, overhead_tokens) for _, layout in cut) < _call_cost(
            whole, span, overhead_tokens
        ):
            return cut
    return ((tuple(range(len(lengths))), whole),)


def _call_cost(layout: PackedLayout, span: int, overhead_tokens: int) -> float:
    return overhead_tokens + layout.padded_tokens * (1 + layout.width / span)


# (prompt, response) pairs whose packed scores must match their scores alone, at load
# (the scalar RMs and the LM; short and long, so that a probe packs several rows per bin).
PAIR_PROBE = (
    ("Where is it?", "It is here, by the door."),
    ("Why?", "Yes."),
    ("Who wrote it, and when?", "A friend of mine, long ago, on a rainy night."),
)

# Packed outputs against outputs alone, at load: float32 to summation order, half
# precision to its rounding (relative to the outputs where they exceed 1).
PACKING_TOLERANCE = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 2e-2}


@dataclass(frozen=True)
class RowPacker:
    """One model's packing: its cost model's terms, and the position offset its load check
    found (None: its rows are not packed)."""

    span: int
    max_width: int
    overhead_tokens: int
    pad_id: int
    position_offset: int | None = None

    @classmethod
    def for_model(
        cls, model_config: object, max_length: int, overhead_tokens: int, pad_id: int
    ) -> RowPacker:
        span = attention_span(int(getattr(model_config, "hidden_size", 768)))
        return cls(span, max_bin_width(model_config, max_length), overhead_tokens, pad_id)

    def forwards(self, lengths: Sequence[int]) -> Forwards:
        return packed_forwards(tuple(lengths), self.span, self.max_width, self.overhead_tokens)

    def padded_tokens(self, lengths: Sequence[int]) -> int:
        return sum(layout.padded_tokens for _, layout in self.forwards(lengths))

    def packs(self, rows: Sequence[Sequence[int]]) -> bool:
        """Whether these rows run packed. RoBERTa-like models (offset pad id + 1) number
        positions over non-pad tokens only, packed positions count every token: a batch
        holding the pad id (a literal pad token in the text) runs unpacked."""
        offset = self.position_offset
        return offset is not None and not (offset > 0 and any(self.pad_id in r for r in rows))

    def run(
        self,
        rows: Sequence[Sequence[int]],
        forward: Callable[[Sequence[Sequence[int]], PackedLayout, int], torch.Tensor],
    ) -> torch.Tensor:
        """`forward`'s outputs (one per row, first dimension) over every packed forward of
        `rows`, gathered back in the rows' order on the outputs' device."""
        return self.run_indexed(
            [len(row) for row in rows],
            lambda indices, layout, offset: forward([rows[i] for i in indices], layout, offset),
        )

    def run_indexed(
        self,
        lengths: Sequence[int],
        forward: Callable[[Sequence[int], PackedLayout, int], torch.Tensor],
    ) -> torch.Tensor:
        """As `run`, for a `forward` that takes the indices of its rows (and so can look up
        whatever else belongs to each row)."""
        assert self.position_offset is not None
        forwards = self.forwards(lengths)
        parts = [forward(indices, layout, self.position_offset) for indices, layout in forwards]
        if len(parts) == 1:
            return parts[0]
        gathered = parts[0].new_empty((len(lengths), *parts[0].shape[1:]))
        for (indices, _), part in zip(forwards, parts, strict=True):
            gathered[list(indices)] = part
        return gathered


def _best_fit_decreasing(lengths: Sequence[int], width: int) -> list[list[int]]:
    """Rows longest first, each into the fullest bin it fits in (a new bin if none)."""
    rooms: list[tuple[int, int]] = []  # (room left, bin), ascending
    bins: list[list[int]] = []
    for index in sorted(range(len(lengths)), key=lengths.__getitem__, reverse=True):
        need = lengths[index]
        at = bisect.bisect_left(rooms, (need, -1))
        if at == len(rooms):
            room, where = width - need, len(bins)
            bins.append([index])
        else:
            room, where = rooms.pop(at)
            bins[where].append(index)
            room -= need
        if room > 0:
            bisect.insort(rooms, (room, where))
    return bins


def narrower_sliding_window(model_config: object, max_length: int) -> bool:
    """Whether a decoder attends through a sliding window narrower than a row may be: a
    packed 4-D mask replaces the window, and a load check's short rows would not show it."""
    window = getattr(model_config, "sliding_window", None)
    return (
        window is not None
        and window < max_length
        and bool(getattr(model_config, "use_sliding_window", True))
    )


def takes_boolean_mask(model_config: object) -> bool:
    """Whether the packed mask goes in as booleans (True: may attend), not additive floats.

    PyTorch's SDPA takes either; with booleans the benchmark's MiniLM ran 4 to 5 % faster
    (a packed batch of 64 holistic rows on a 2-core CPU: 623 against 650 ms, about what no
    mask at all costs). Eager attention adds the mask to its scores: floats there."""
    return getattr(model_config, "_attn_implementation", None) == "sdpa"


@dataclass(frozen=True)
class PackedBatch:
    """A layout's tensors: what the encoder gets, and which row each token belongs to."""

    input_ids: torch.Tensor  # (B, W)
    position_ids: torch.Tensor  # (B, W)
    attention_mask: torch.Tensor  # (B, 1, W, W) additive (0 within a row, dtype min across)
    # or, for a boolean dtype, True where a token may attend
    row_of_token: torch.Tensor  # (B * W,) the row of each token; len(rows) for padding
    row_cells: torch.Tensor  # (N,) one flat cell of each row, in (B * W,): the one its
    # model reads (a head's pooled token), or its first token's

    @classmethod
    def on_device(
        cls, tokens: torch.Tensor, row_cells: torch.Tensor, mask_dtype: torch.dtype, causal: bool
    ) -> PackedBatch:
        """The batch from `packed_tokens`' arrays on the device, the (B, 1, W, W) mask built
        there from the row numbers. Device ops only, shapes read from the tensors: a packed
        forward traces this with the model, so the mask costs no call from Python.
        `causal`: a token attends to its own row's earlier tokens only (decoders)."""
        ids, positions, row_grid = tokens.unbind(0)  # (B, W) each
        mask = packed_mask(row_grid, mask_dtype, causal)
        return cls(ids, positions, mask, row_grid.reshape(-1), row_cells)


def packed_mask(row_grid: torch.Tensor, mask_dtype: torch.dtype, causal: bool) -> torch.Tensor:
    """(B, 1, W, W) from each token's row number (B, W), on its device: boolean (True: may
    attend) or additive (0 within a row, the dtype's min across). Shapes are read from the
    tensor, so a trace keeps them."""
    # Padding shares one row number: it attends to padding only.
    allowed = row_grid[:, None, :, None] == row_grid[:, None, None, :]  # (B, 1, W, W)
    if causal:
        width = row_grid.shape[1]
        allowed &= torch.ones(width, width, dtype=torch.bool, device=row_grid.device).tril()
    if mask_dtype == torch.bool:
        return allowed
    mask = torch.zeros(allowed.shape, dtype=mask_dtype, device=row_grid.device)
    return mask.masked_fill_(~allowed, torch.finfo(mask_dtype).min)


def packed_tokens(
    rows: Sequence[Sequence[int]], layout: PackedLayout, pad_id: int, position_offset: int
) -> tuple[np.ndarray, np.ndarray]:
    """Lay `rows` out as `layout` says, on the host: (3, B, W) ids, positions and each
    token's row (len(rows) for padding), in one array so that one copy moves them, and
    (N,) each row's first cell (`row_start_cells`)."""
    width, count = layout.width, len(rows)
    order = [index for members in layout.bins for index in members]
    lengths = np.array([len(rows[i]) for i in order], dtype=np.int64)
    row_start = row_start_cells([len(row) for row in rows], layout)
    token_offset = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    token_cell = np.repeat(row_start[order], lengths) + token_offset
    tokens = np.empty((3, len(layout.bins) * width), dtype=np.int64)
    ids, positions, row_of_token = tokens
    ids.fill(pad_id)
    ids[token_cell] = np.fromiter(
        (t for i in order for t in rows[i]), dtype=np.int64, count=int(lengths.sum())
    )
    positions.fill(0)
    positions[token_cell] = token_offset + position_offset
    row_of_token.fill(count)
    row_of_token[token_cell] = np.repeat(np.array(order, dtype=np.int64), lengths)
    return tokens.reshape(3, len(layout.bins), width), row_start


def packed_batch(
    rows: Sequence[Sequence[int]],
    layout: PackedLayout,
    pad_id: int,
    position_offset: int,
    dtype: torch.dtype,
    device: str,
    causal: bool = False,
) -> PackedBatch:
    """`rows` laid out as `layout` says, on `device`, `row_cells` at each row's first token
    (the adapters copy `packed_tokens`' arrays themselves; this serves tests and tools)."""
    tokens, row_start = packed_tokens(rows, layout, pad_id, position_offset)
    return PackedBatch.on_device(
        to_device(tokens, device), to_device(row_start, device), dtype, causal
    )


def row_start_cells(lengths: Sequence[int], layout: PackedLayout) -> np.ndarray:
    """(N,) the flat cell (bin x width + place in the bin) of each row's first token, rows
    end to end in their bins in the layout's order. On the host: a forward that reads its
    rows' tokens indexes them without reading anything back from the device."""
    starts = np.empty(len(lengths), dtype=np.int64)
    if not layout.bins:
        return starts
    bin_of_row = np.repeat(np.arange(len(layout.bins)), [len(m) for m in layout.bins])
    start_in_bin = np.concatenate(
        [np.cumsum([0, *(lengths[i] for i in m)])[:-1] for m in layout.bins]
    )
    starts[[index for members in layout.bins for index in members]] = (
        bin_of_row * layout.width + start_in_bin
    )
    return starts


def mean_pooled(hidden: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
    """(N, H) float32: each row's mean hidden state over its own tokens. The row count is
    read from `row_cells`' shape: a trace keeps the read, not its traced batch's count."""
    count = batch.row_cells.shape[0]
    flat = hidden.reshape(-1, hidden.shape[-1]).float()  # (B * W, H)
    sums = torch.zeros(count + 1, flat.shape[-1], device=flat.device).index_add_(
        0, batch.row_of_token, flat
    )
    # Not `bincount`: on a GPU it reads the largest row number back to size its output,
    # and so waits for the forward mid-graph.
    ones = torch.ones_like(batch.row_of_token, dtype=torch.float32)  # (B * W,)
    tokens = torch.zeros(count + 1, device=flat.device).index_add_(0, batch.row_of_token, ones)
    return (sums / tokens.clamp(min=1)[:, None])[:count]


def pack_to_width(lengths: Sequence[int], width: int) -> PackedLayout:
    bins = _best_fit_decreasing(lengths, width)
    used = max((sum(lengths[i] for i in members) for members in bins), default=0)
    return PackedLayout(used, tuple(map(tuple, bins)))


def packing_position_offset(
    embed_packed: Callable[[Sequence[Sequence[int]], PackedLayout, int], torch.Tensor],
    embed_alone: Callable[[Sequence[Sequence[int]]], torch.Tensor],
    probe_rows: Sequence[Sequence[int]],
    offsets: Sequence[int],
    tolerance: float,
    max_positions: int,
) -> int | None:
    """The position offset at which packed rows embed (or score) as they do alone, or None
    if none does, or if the model refuses a 4-D mask or position ids. Found once, at load.

    BERT-like encoders count positions from 0, RoBERTa-like ones from the pad id + 1. The
    probe is packed into one bin and into bins as wide as its longest row.
    """
    alone = embed_alone(probe_rows)
    scale = max(1.0, float(alone.abs().max()))  # relative to outputs larger than 1 (scores)
    lengths = [len(r) for r in probe_rows]
    layouts = [pack_to_width(lengths, sum(lengths)), pack_to_width(lengths, max(lengths))]
    errors: dict[int, float] = {}
    for offset in offsets:
        if offset + max(lengths) > max_positions:
            continue  # past the positions table: a device-side assert on a GPU
        try:
            packed = [embed_packed(probe_rows, layout, offset) for layout in layouts]
        except Exception as exc:  # compilers and encoders raise no common base
            log.warning("rows not packed: the encoder refused packed inputs (%r)", exc)
            return None
        errors[offset] = max(float((p - alone).abs().max()) for p in packed) / scale
    # The closest offset, not the first within tolerance: in half precision a wrong offset
    # could pass a loose tolerance.
    best = min(errors, key=errors.__getitem__, default=None)
    if best is None or errors[best] > tolerance:
        log.warning("rows not packed: packed embeddings differ from unpacked ones (%s)", errors)
        return None
    return best
