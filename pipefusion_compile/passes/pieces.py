"""Pieces: the microbatches one step runs through the stages.

A step is a sequence of pieces, each one compiled stage graph per stage:

    full   the whole sequence (warmup steps; every step when M = 1 on a joint sequence)
    band   image token rows [row0, row0 + rows) (the PipeFusion patches)
    head   the tokens of other groups *before* the image along the token axis: Flux's and CogVideoX's text,
           U-ViT's time and class tokens; one more patch of the joint sequence, processed once per pipelined
           step, first
    tail   the tokens *after* the image: SD3's text, register tokens; once per pipelined step, last

Along a token axis a value holds `prefix` elements of the head group, the image part (`per_row` elements per
token row) and `suffix` elements of the tail group (`TokenInfo`); a value with no image part holds one of the
two (prefix or suffix says which). A piece keeps, of every value, only its own part: `extent` and
`token_range` say which elements those are.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import PlanError
from .meta import Kind, TokenInfo, ValueEnum


class PieceKind(ValueEnum):
    """The kind of a piece. A str, printed as its value ("band"): stage names (`stage_band4`), compiled-graph
    keys and messages read as plain words, and a member equals its value."""

    FULL = "full"
    BAND = "band"
    HEAD = "head"
    TAIL = "tail"


FULL, BAND, HEAD, TAIL = PieceKind.FULL, PieceKind.BAND, PieceKind.HEAD, PieceKind.TAIL
EXTRA = (HEAD, TAIL)   # the pieces of the other token groups (text, extra tokens), once per step


@dataclass(frozen=True)
class Piece:
    kind: PieceKind  # FULL, BAND, HEAD or TAIL
    row0: int = 0    # first token row (BAND; 0 otherwise)
    rows: int = 0    # token rows (BAND and FULL; 0 for HEAD and TAIL)
    split: tuple[int, ...] = ()   # sequence parallelism: the token rows of each rank's part of the band this
                                  # BAND piece is one part of (`sub_band`); empty without

    @property
    def key(self) -> tuple:
        """What the compiled graph depends on (the row offset is a run-time input)."""
        if self.kind in EXTRA:
            return (self.kind,)
        return (self.kind, self.rows, self.split) if self.split else (self.kind, self.rows)

    @property
    def index_name(self) -> str:
        return {FULL: "full sequence", HEAD: "tokens before the image", TAIL: "tokens after the image"}.get(
            self.kind, f"rows [{self.row0}, {self.row0 + self.rows})")


def patch_bands(rows: int, num_patches: int) -> tuple[tuple[int, int], ...]:
    """M row bands as equal as possible; when M does not divide the rows, the later bands are one shorter."""
    if num_patches > rows:
        raise PlanError(
            f"num_patches={num_patches} is larger than the {rows} token rows of the image: a patch needs at "
            "least one token row"
        )
    q, r = divmod(rows, num_patches)
    bands, start = [], 0
    for j in range(num_patches):
        n = q + (1 if j < r else 0)
        bands.append((start, n))
        start += n
    return tuple(bands)


def sub_band(band: Piece, parts: int, index: int) -> Piece:
    """Part `index` of a band split as the image is into bands (`patch_bands`): what sequence-parallel rank
    `index` of a stage runs of it. Every part has at least one row (`plan.check_sequence_parallel`)."""
    split = tuple(n for _, n in patch_bands(band.rows, parts))
    return Piece(BAND, band.row0 + sum(split[:index]), split[index], split)


def holds(info: TokenInfo | None, kind: PieceKind) -> bool:
    """Does a token-carrying value (as described by `info`) have a part in pieces of `kind`?"""
    if info is not None and info.kind is Kind.REDUCED:   # a reduction over the image tokens
        return kind in (FULL, BAND)
    if info is None or not info.carries_tokens:
        return False
    if info.elements is not None:
        return any(holds(e, kind) for e in info.elements)
    if kind == FULL:
        return True
    if kind == BAND:
        return info.epr > 0
    return bool(info.prefix if kind == HEAD else info.suffix)


def extent(info: TokenInfo, per_row: int, token_rows: int, piece: Piece) -> int:
    """Elements along `info.axis` that `piece` holds of a value (positional tables too)."""
    return extent_of(info.prefix, info.suffix, per_row, token_rows, piece)


def extent_of(prefix: int, suffix: int, per_row: int, token_rows: int, piece: Piece) -> int:
    if piece.kind == FULL:
        return prefix + suffix + per_row * token_rows
    if piece.kind == BAND:
        return per_row * piece.rows
    return prefix if piece.kind == HEAD else suffix


def group_offset(prefix: int, suffix: int, full: int, kind: PieceKind) -> int:
    """Where the token group that pieces of `kind` hold starts along a token axis of `full` elements (a band
    adds its own rows to this): FULL and HEAD at 0, BAND after the head group, TAIL after the image."""
    if kind in (FULL, HEAD):
        return 0
    if kind == BAND:
        return prefix
    return full - suffix


def token_range(prefix: int, suffix: int, per_row: int, token_rows: int, piece: Piece) -> tuple[int, int]:
    """(start, length) along the token axis of the full-sequence value that `piece` holds."""
    full = prefix + suffix + per_row * token_rows
    start = group_offset(prefix, suffix, full, piece.kind) + piece.row0 * per_row
    return start, extent_of(prefix, suffix, per_row, token_rows, piece)
