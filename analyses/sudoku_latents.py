"""Latent panels (the TRM paper's Figure 6): per puzzle, the input x, target y, prediction ŷ,
the tokenized z_H and z_L after the last ACT step, and a sixth panel of correctness shaded by
confidence. A latent vector is "tokenized" by reverse embedding: the token whose embedding has the
largest dot product (default) or cosine similarity with it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from reportgen.boards import TITLE_H, Cell, board_height, draw_board, given_cell, symbol_key, token_str
from reportgen.figures import ACCENT, BAD, GIVEN_BG, GOOD, INK, MUTED, Canvas, Figure, mix
from reportgen.probes.trm import reverse_embed
from reportgen.stats import proportion

NAME = "sudoku_latents"
TITLE = "Latent panels"
SUBJECTS = ("trm",)
USES_EVAL = True  # its metric is over the evaluation set (trace.eval); the panels draw the samples


@dataclass
class Params:
    method: str = "dot"  # reverse embedding: dot | cosine

    def __post_init__(self):
        if self.method not in ("dot", "cosine"):
            raise ValueError(f"method must be dot or cosine, not {self.method!r}")


def compute(trace, params: Params) -> dict:
    P = trace.prefix_len
    if params.method == "dot":
        zh, zl = trace.z_H_tokens[-1], trace.z_L_tokens[-1]  # [N, 81], computed by the probe
    else:
        zh = reverse_embed(trace.z_H[:, P:], trace.embedding, "cosine")
        zl = reverse_embed(trace.z_L[:, P:], trace.embedding, "cosine")
    pred, conf = trace.preds[-1], trace.confidence[-1]
    lens = trace.arrays["z_L_lens_tokens"][-1] if "z_L_lens_tokens" in trace.arrays else None  # [N, 81]
    samples = []
    for i in range(trace.n):
        inp, lab = trace.inputs[i], trace.labels[i]
        blank = inp == 1
        correct = pred[i] == lab
        samples.append({
            "puzzle_index": int(trace.puzzle_index[i]),
            "inputs": inp.tolist(),
            "labels": lab.tolist(),
            "preds": pred[i].tolist(),
            "confidence": np.round(conf[i], 5).tolist(),
            "z_H_tokens": zh[i].tolist(),
            "z_L_tokens": zl[i].tolist(),
            "blanks": int(blank.sum()),
            "blank_accuracy": float(correct[blank].mean()) if blank.any() else 1.0,
            "solved": bool(correct.all()),
            "z_H_matches_target": float((zh[i] == lab).mean()),
            "z_L_matches_target": float((zl[i] == lab).mean()),
        })
        if lens is not None:  # lm_head(z_L): does z_L carry the answer in the output's own basis?
            samples[-1]["z_L_lens"] = lens[i].tolist()
    ev = getattr(trace, "eval", None)
    evaluation = None if ev is None else {  # dot reverse embedding after the last step, over every evaluated cell
        "z_H_matches_target": proportion(ev.z_H_match.sum(), 81 * ev.n),
        "z_L_matches_target": proportion(ev.z_L_match.sum(), 81 * ev.n)}
    return {"method": params.method, "step": int(trace.steps), "samples": samples, "evaluation": evaluation}


PANELS = ("Input x", "Target y", "Prediction ŷ", "Tokenized z_H", "Tokenized z_L", "Correct? (shade = confidence)")


def panel_cells(s: dict) -> list[list[Cell]]:
    """The six panels of one sample as lists of 81 styled cells."""
    inp, lab, pred, conf = s["inputs"], s["labels"], s["preds"], s["confidence"]
    given = [t != 1 for t in inp]
    panels: list[list[Cell]] = [[] for _ in PANELS]
    for k in range(81):
        g = given[k]
        panels[0].append(given_cell(inp[k]) if g else Cell())
        panels[1].append(given_cell(lab[k]) if g else Cell(token_str(lab[k])))
        ok = pred[k] == lab[k]
        panels[2].append(given_cell(pred[k]) if g and ok else Cell(token_str(pred[k], "·"), color=INK if ok else BAD,
                                                                   bold=not ok, mark=None if ok else BAD))
        for p, key in ((3, "z_H_tokens"), (4, "z_L_tokens")):
            t = s[key][k]
            panels[p].append(Cell(token_str(t, "·"), fill=mix("#ffffff", ACCENT, 0.18) if t == lab[k] else None,
                                  color=INK if t == lab[k] else MUTED))
        if g:
            panels[5].append(Cell(token_str(pred[k], "·"), fill=GIVEN_BG, color=MUTED))
        else:
            base = GOOD if ok else BAD
            shade = 0.15 + 0.7 * float(conf[k])
            panels[5].append(Cell(token_str(pred[k], "·"), fill=mix("#ffffff", base, shade),
                                  color="#ffffff" if shade > 0.55 else INK, bold=not ok))
    return panels


LENS_PANEL = "lm_head(z_L)"


def lens_cells(s: dict) -> list[Cell]:
    """The logit-lens readout of z_L as 81 cells, tinted where it equals the target (as the latent panels)."""
    lab = s["labels"]
    return [Cell(token_str(t, "·"), fill=mix("#ffffff", ACCENT, 0.18) if t == lab[k] else None,
                 color=INK if t == lab[k] else MUTED) for k, t in enumerate(s["z_L_lens"])]


def draw_sample(s: dict, cell: float = 22, cols: int = 3) -> Canvas:
    gap_x, gap_y = 18, 10
    bw, bh = 9 * cell, board_height(cell, 1)
    rows = -(-len(PANELS) // cols)
    c = Canvas(cols * bw + (cols - 1) * gap_x + 8, rows * bh + (rows - 1) * gap_y + 8)
    for p, (name, cells) in enumerate(zip(PANELS, panel_cells(s))):
        r, q = divmod(p, cols)
        draw_board(c, 4 + q * (bw + gap_x), 4 + r * (bh + gap_y), cells, cell=cell, title=name)
    return c


def figures(data: dict, params: Params) -> list[Figure]:
    out = []
    how = "largest dot product" if data["method"] == "dot" else "largest cosine similarity"
    for i, s in enumerate(data["samples"]):
        verdict = "solved" if s["solved"] else f"{s['blank_accuracy']:.0%} of {s['blanks']} blanks correct"
        drawing = draw_sample(s)
        key = symbol_key(drawing)
        out.append(Figure(
            key=f"sample-{i}",
            caption=(
                f"Puzzle {s['puzzle_index']} after ACT step {data['step']} ({verdict}). Grey cells are givens. "
                f"ŷ marks wrong cells in red with a corner tick. z_H and z_L are tokenized by the token with the "
                f"{how} to each cell's latent vector" + (f" ({key})" if key else "")
                + "; tinted cells equal the target. The last "
                f"panel colours blanks green (correct) or red (wrong), darker for higher confidence (max softmax)."
            ),
            drawing=drawing,
            alt=f"Six Sudoku boards for puzzle {s['puzzle_index']}",
        ))
    return out


def metrics(data: dict) -> dict:
    """Share of all cells (81 per evaluated puzzle) whose dot-reverse-embedded z_H equals the target."""
    return {"z_H_matches_target": data["evaluation"]["z_H_matches_target"]} if data.get("evaluation") else {}


def run_figure(items: list[tuple[str, dict]]) -> Figure | None:
    """Across a run: the same puzzle's prediction and tokenized latents at every checkpoint, one row each,
    so a reader sees the solution emerge over training. `items` are (checkpoint label, this analysis's
    data) in step order; the puzzle is the one, among those every report contains, whose blank-cell accuracy
    rises most from the first checkpoint to the last."""
    if not items:
        return None
    common = set.intersection(*({s["puzzle_index"] for s in d["samples"]} for _, d in items))
    if not common:
        return None
    def acc(d, p):
        return next(x["blank_accuracy"] for x in d["samples"] if x["puzzle_index"] == p)

    pz = max(sorted(common), key=lambda p: acc(items[-1][1], p) - acc(items[0][1], p))  # the most improved puzzle
    cell, gap_x, gap_y, label_w = 16, 14, 8, 92
    picked = [next(x for x in d["samples"] if x["puzzle_index"] == pz) for _, d in items]
    with_lens = all("z_L_lens" in s for s in picked)
    cols = (2, 3, 4, 6) if with_lens else (2, 3, 4)  # prediction ŷ, tokenized z_H, tokenized z_L (, lm_head(z_L))
    bw, bh = 9 * cell, board_height(cell, 1)
    c = Canvas(label_w + len(cols) * (bw + gap_x) + 4, len(items) * (bh + gap_y) + 8)
    for r, ((label, d), s) in enumerate(zip(items, picked)):
        panels = panel_cells(s)
        if with_lens:
            panels.append(lens_cells(s))
        y = 4 + r * (bh + gap_y)
        verdict = "solved" if s["solved"] else f"{s['blank_accuracy']:.0%} of blanks"
        c.text(4, y + bh / 2 - 6, label, size=10, anchor="start", bold=True)
        c.text(4, y + bh / 2 + 8, verdict, size=8.5, anchor="start", fill=GOOD if s["solved"] else MUTED)
        for k, p in enumerate(cols):  # titles over the first row only; every board sits below a title's height
            x = label_w + k * (bw + gap_x)
            if r == 0:
                draw_board(c, x, y, panels[p], cell=cell, title=PANELS[p] if p < len(PANELS) else LENS_PANEL)
            else:
                draw_board(c, x, y + TITLE_H, panels[p], cell=cell)
    return Figure("trend-sudoku_latents", (
        f"Puzzle {pz} (of those in every report, the one whose blank-cell accuracy rose most) across the run: the "
        f"prediction ŷ and the tokenized z_H and z_L after the last ACT step"
        + (", and z_L read through the output head (lm_head(z_L), the logit lens)" if with_lens else "")
        + ", one row per checkpoint in training order. Red digits with a corner tick are wrong; tinted latent cells "
        "equal the target. Read down a column to see the solution emerge over training"
        + (" and whether z_L comes to carry the answer itself." if with_lens else ".")), c,
        alt=f"Boards of puzzle {pz} at every checkpoint")
