"""Pieces: the microbatches one step runs through the stages.

A step is a sequence of pieces, each one compiled stage graph per stage:

    full   the whole sequence (warmup steps; every step when M = 1 on a joint text+image model)
    band   image token rows [row0, row0 + rows) (the PipeFusion patches)
    text   the text group of a joint text+image sequence (SD3, Flux, CogVideoX): one more patch of the
           joint sequence, processed once per pipelined step at its place in the sequence (first when the
           text comes before the image along the token axis, as in Flux; last when after it, as in SD3)

Along a token axis a value holds `prefix` text elements, the image part (`per_row` elements per token row)
and `suffix` text elements (`TokenInfo`); at most one of prefix/suffix is non-zero in a lowered graph. A
piece keeps, of every value, only its own part: `extent` and `token_range` say which elements those are.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import UnsupportedGraphError
from .meta import TokenInfo

FULL, BAND, TEXT = "full", "band", "text"


@dataclass(frozen=True)
class Piece:
    kind: str        # FULL, BAND or TEXT
    row0: int = 0    # first token row (BAND; 0 otherwise)
    rows: int = 0    # token rows (BAND and FULL; 0 for TEXT)

    @property
    def key(self) -> tuple:
        """What the compiled graph depends on (the row offset is a run-time input)."""
        return (self.kind,) if self.kind == TEXT else (self.kind, self.rows)

    @property
    def index_name(self) -> str:
        return {FULL: "full sequence", TEXT: "text"}.get(self.kind, f"rows [{self.row0}, {self.row0 + self.rows})")


def holds(info: TokenInfo | None, kind: str) -> bool:
    """Does a token-carrying value (as described by `info`) have a part in pieces of `kind`?"""
    if info is None or not info.carries_tokens:
        return False
    if info.elements is not None:
        return any(holds(e, kind) for e in info.elements)
    if kind == FULL:
        return True
    if kind == BAND:
        return info.epr > 0
    return bool(info.prefix or info.suffix)


def extent(info: TokenInfo, per_row: int, token_rows: int, piece: Piece) -> int:
    """Elements along `info.axis` that `piece` holds of a value (positional tables too)."""
    return extent_of(info.prefix, info.suffix, per_row, token_rows, piece)


def extent_of(prefix: int, suffix: int, per_row: int, token_rows: int, piece: Piece) -> int:
    if piece.kind == FULL:
        return prefix + suffix + per_row * token_rows
    if piece.kind == BAND:
        return per_row * piece.rows
    return prefix + suffix


def check_one_text_group(info: TokenInfo, node) -> None:
    """The lowering keeps one text group per value, before or after the image part: refuse both sides."""
    if info.prefix and info.suffix:
        raise UnsupportedGraphError(
            "text tokens on both sides of the image tokens along the token axis (one text group, before or "
            "after the image, is supported)", node)


def group_offset(prefix: int, suffix: int, full: int, kind: str) -> int:
    """Where the token group that pieces of `kind` hold starts along a token axis of `full` elements (a band
    adds its own rows to this): FULL at 0, BAND after the text before the image, TEXT where the text lies."""
    if kind == FULL:
        return 0
    if kind == BAND:
        return prefix
    return 0 if prefix else full - suffix


def token_range(prefix: int, suffix: int, per_row: int, token_rows: int, piece: Piece) -> tuple[int, int]:
    """(start, length) along the token axis of the full-sequence value that `piece` holds."""
    full = prefix + suffix + per_row * token_rows
    start = group_offset(prefix, suffix, full, piece.kind) + piece.row0 * per_row
    return start, extent_of(prefix, suffix, per_row, token_rows, piece)
