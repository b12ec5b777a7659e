"""Step-by-step solving: per puzzle, the predicted board after every ACT step, with the cells that
changed since the previous step, wrong cells, confidence, q_halt per step, and the first step where
the model's own halting signal fires (q_halt > 0) against the first step where the board is correct.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from reportgen.boards import Cell, board_height, draw_board, given_cell, symbol_key, token_str
from reportgen.figures import ACCENT, BAD, CHANGED, GOOD, INK, Canvas, Figure, mix

NAME = "step_evolution"
TITLE = "Step-by-step solving"
SUBJECTS = ("trm",)


@dataclass
class Params:
    max_samples: int = 5  # puzzles drawn (all are in the data export)
    columns: int = 6  # boards per row

    def __post_init__(self):
        if self.max_samples < 1 or self.columns < 1:
            raise ValueError("max_samples and columns must be at least 1")


def first_step(mask: np.ndarray) -> int | None:
    """1-based index of the first True in a per-step mask, or None."""
    idx = np.flatnonzero(mask)
    return int(idx[0]) + 1 if len(idx) else None


def compute(trace, params: Params) -> dict:
    preds, labels, inputs = trace.preds, trace.labels, trace.inputs  # [T,N,81], [N,81], [N,81]
    T = trace.steps
    correct = preds == labels[None]  # [T, N, 81]
    changed = np.zeros_like(correct)
    changed[1:] = preds[1:] != preds[:-1]  # step 1 has no previous step
    blank = inputs == 1
    samples = []
    for i in range(trace.n):
        solved = correct[:, i].all(-1)  # [T]
        halt = trace.q_halt[:, i] > 0
        b = blank[i]
        samples.append({
            "puzzle_index": int(trace.puzzle_index[i]),
            "inputs": inputs[i].tolist(),
            "labels": labels[i].tolist(),
            "steps": [
                {
                    "step": t + 1,
                    "preds": preds[t, i].tolist(),
                    "confidence": np.round(trace.confidence[t, i], 5).tolist(),
                    "changed": np.flatnonzero(changed[t, i]).tolist(),
                    "wrong": np.flatnonzero(~correct[t, i]).tolist(),
                    "q_halt": float(trace.q_halt[t, i]),
                    "blank_accuracy": float(correct[t, i][b].mean()) if b.any() else 1.0,
                    "solved": bool(solved[t]),
                }
                for t in range(T)
            ],
            "first_halt_step": first_step(halt),
            "first_correct_step": first_step(solved),
        })
    return {"steps": int(T), "samples": samples}


def draw_sample(s: dict, columns: int = 6, width: float = 880) -> Canvas:
    steps = s["steps"]
    cols = min(columns, len(steps))
    cell = min(20.0, (width / cols - 14) / 9)  # fill about `width` px, boards no larger than the latent panels
    rows = -(-len(steps) // cols)
    gap_x, gap_y = 14, 10
    bw, bh = 9 * cell, board_height(cell, 2)
    legend_h = 22
    c = Canvas(cols * bw + (cols - 1) * gap_x + 8, rows * bh + (rows - 1) * gap_y + 8 + legend_h)
    given = [t != 1 for t in s["inputs"]]
    for k, st in enumerate(steps):
        r, q = divmod(k, cols)
        changed, wrong = set(st["changed"]), set(st["wrong"])
        cells = []
        for j in range(81):
            if given[j] and j not in wrong:
                cells.append(given_cell(s["inputs"][j]))
                continue
            bad = j in wrong
            conf = st["confidence"][j]
            cells.append(Cell(
                token_str(st["preds"][j], "·"),
                fill=mix("#ffffff", ACCENT, 0.45 * conf),
                color=BAD if bad else INK,
                bold=bad,
                outline=CHANGED if j in changed else None,
                mark=BAD if bad else None,
            ))
        tags = []
        if st["step"] == s["first_halt_step"]:
            tags.append("halts")
        if st["step"] == s["first_correct_step"]:
            tags.append("first solved")
        title = f"step {st['step']}" + (f" · {', '.join(tags)}" if tags else "")
        sub = f"q_halt {st['q_halt']:+.2f} · {st['blank_accuracy']:.0%} · Δ{len(changed)}"
        draw_board(c, 4 + q * (bw + gap_x), 4 + r * (bh + gap_y), cells, cell=cell, title=title, subtitle=sub,
                   title_color=GOOD if st["solved"] else INK)
    # legend
    y = c.height - legend_h / 2 - 2
    x = 6
    for fill, outline, text in ((mix("#ffffff", ACCENT, 0.45), None, "shade = confidence"),
                                (None, CHANGED, "changed since previous step"),
                                (None, None, "wrong (red, corner tick)")):
        c.rect(x, y - 5, 10, 10, fill=fill or "#ffffff", stroke=outline or (BAD if not fill else "#afb8c1"), width=1.5)
        c.text(x + 14, y, text, size=8.5, anchor="start")
        x += 14 + 7 * len(text) + 16
    return c


def figures(data: dict, params: Params) -> list[Figure]:
    out = []
    for i, s in enumerate(data["samples"][: params.max_samples]):
        fh, fc = s["first_halt_step"], s["first_correct_step"]
        verdict = (f"The model's halting signal first fires at step {fh}" if fh else "The halting signal never fires") + (
            f"; the board is first fully correct at step {fc}." if fc else "; the board is never fully correct.")
        drawing = draw_sample(s, columns=params.columns)
        key = symbol_key(drawing)
        out.append(Figure(
            key=f"sample-{i}",
            caption=(
                f"Puzzle {s['puzzle_index']}, predicted board after each of the {data['steps']} ACT steps. "
                f"Grey cells are givens; blue shading is the cell's confidence (max softmax); yellow outlines mark "
                f"cells changed since the previous step (Δ counts them); red digits with a corner tick are wrong. "
                f"Each board's subtitle gives q_halt and the blank-cell accuracy." + (f" Symbols: {key}." if key else "")
                + f" {verdict}"
            ),
            drawing=drawing,
            alt=f"Boards per ACT step for puzzle {s['puzzle_index']}",
        ))
    return out
