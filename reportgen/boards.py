"""Sudoku boards drawn on a `Canvas`: the building block of the TRM figures.

Token ids are upstream's: 0 = PAD, 1 = blank, d + 1 = digit d.
"""
from __future__ import annotations

from dataclasses import dataclass

from .figures import GIVEN_BG, INK, MUTED, Canvas

TITLE_H = 16  # height reserved above a board for its title line(s)
# symbols a board may show for a token that is not a digit, and what they mean (for captions)
SYMBOLS = (("∅", "PAD, the padding token (id 0)"), ("·", "the blank token (id 1)"))


def token_str(t: int, blank: str = "") -> str:
    t = int(t)
    if t == 0:
        return "∅"
    if t == 1:
        return blank
    return str(t - 1)


def symbol_key(canvas: Canvas) -> str:
    """'∅ = PAD, the padding token (id 0); · = …' for the non-digit symbols drawn on `canvas`; '' when none."""
    drawn = {it[3] for it in canvas.items if it[0] == "text"}
    return "; ".join(f"{sym} = {meaning}" for sym, meaning in SYMBOLS if sym in drawn)


@dataclass
class Cell:
    text: str = ""
    fill: str | None = None
    color: str = INK
    bold: bool = False
    outline: str | None = None  # colour of an inner outline (e.g. changed cells)
    mark: str | None = None  # colour of a small corner triangle-like tick (e.g. wrong cells)


def given_cell(tok: int) -> Cell:
    return Cell(token_str(tok), fill=GIVEN_BG, bold=True)


def draw_board(c: Canvas, x: float, y: float, cells: list[Cell], cell: float = 20,
               title: str | None = None, subtitle: str | None = None, title_color: str = INK,
               font_scale: float = 0.55) -> None:
    """A 9×9 board with its top-left corner at (x, y + TITLE_H·lines); titles are drawn above it."""
    lines = [t for t in (title, subtitle) if t]
    for i, t in enumerate(lines):
        c.text(x + 4.5 * cell, y + 7 + i * 12, t, size=10 if i == 0 else 8.5,
               fill=title_color if i == 0 else MUTED, bold=i == 0)
    y0 = y + TITLE_H + 12 * max(0, len(lines) - 1) if lines else y
    fs = cell * font_scale
    for i, ce in enumerate(cells):
        r, col = divmod(i, 9)
        cx, cy = x + col * cell, y0 + r * cell
        if ce.fill:
            c.rect(cx, cy, cell, cell, fill=ce.fill)
        if ce.outline:
            inset = max(1.0, cell * 0.08)
            c.rect(cx + inset, cy + inset, cell - 2 * inset, cell - 2 * inset, stroke=ce.outline, width=max(1.0, cell * 0.09))
        if ce.mark:
            m = cell * 0.28
            c.rect(cx + cell - m, cy, m, m, fill=ce.mark)
        if ce.text:
            c.text(cx + cell / 2, cy + cell / 2 + 0.5, ce.text, size=fs, fill=ce.color, bold=ce.bold)
    for k in sorted(range(10), key=lambda k: k % 3 == 0):  # thin grid lines first, box lines on top
        w = 1.6 if k % 3 == 0 else 0.5
        col = INK if k % 3 == 0 else "#afb8c1"
        c.line(x + k * cell, y0, x + k * cell, y0 + 9 * cell, stroke=col, width=w)
        c.line(x, y0 + k * cell, x + 9 * cell, y0 + k * cell, stroke=col, width=w)


def board_height(cell: float, n_title_lines: int) -> float:
    return 9 * cell + (TITLE_H + 12 * max(0, n_title_lines - 1) if n_title_lines else 0)
