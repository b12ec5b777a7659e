"""Figures of the recursion analysis (analyses/recursion.py): they draw its data, never compute statistics."""
from __future__ import annotations

import numpy as np

from reportgen.boards import Cell, board_height, draw_board, given_cell, symbol_key, token_str
from reportgen.figures import ACCENT, BAD, CHANGED, GOOD, INK, MUTED, Canvas, Figure, metric_line, mpl_figure


def _shown_steps(T: int, most: int) -> list[int]:
    if T <= most:
        return list(range(T))
    return sorted({int(round(x)) for x in np.linspace(0, T - 1, most)})


def _shown_cycles(labels: list[str]) -> list[int]:
    """All cycles when they fit (at most 8 per latent); otherwise the H-cycle ends only."""
    if len(labels) <= 8:
        return list(range(len(labels)))
    return [c for c, l in enumerate(labels) if l.startswith("H")]


def draw_tokens(s: dict, steps: list[int], cycles: list[int], cell: float = 7.5) -> Canvas:
    """Rows: ACT steps; columns: the cycles of z_H, then those of z_L. Each board is the reverse embedding of
    the latent's cells; outlined cells changed since the previous cycle of the same latent (across the step
    boundary too), red digits differ from the target, grey cells are the puzzle's givens."""
    labels = s["cycles"]
    ncol = 2 * len(cycles)
    gap_x, gap_y, group_gap, left = 8, 8, 22, 46
    bw, bh = 9 * cell, board_height(cell, 1)
    width = left + ncol * bw + (ncol - 1) * gap_x + group_gap + 8
    c = Canvas(width, 22 + len(steps) * (bh + gap_y) + 36)
    given = [t != 1 for t in s["inputs"]]
    for g, z in enumerate(("H", "L")):
        toks = s[f"z_{z}_tokens"]  # [T][C][81]
        x0 = left + g * (len(cycles) * (bw + gap_x) + group_gap)
        c.text(x0 + (len(cycles) * (bw + gap_x) - gap_x) / 2, 9, f"z_{z}, reverse embedding", size=10, bold=True)
        for r, t in enumerate(steps):
            y = 20 + r * (bh + gap_y)
            if g == 0:
                c.text(4, y + bh / 2 + 6, f"step {t + 1}", size=9, anchor="start")
            for k, cyc in enumerate(cycles):
                cur = toks[t][cyc]
                if cyc > 0:
                    prev = toks[t][cyc - 1]
                elif t > 0:
                    prev = toks[t - 1][-1]
                else:
                    prev = None
                cells = []
                for j in range(81):
                    wrong = cur[j] != s["labels"][j]
                    ce = given_cell(cur[j]) if given[j] and not wrong else Cell(
                        token_str(cur[j], "·"), color=BAD if wrong else INK, bold=wrong)
                    ce.outline = CHANGED if prev is not None and prev[j] != cur[j] else None
                    cells.append(ce)
                right = sum(1 for j in range(81) if cur[j] == s["labels"][j])
                draw_board(c, x0 + k * (bw + gap_x), y, cells, cell=cell, title=f"{labels[cyc]} · {right}/81",
                           font_scale=0.7)
    for k, (stroke, text) in enumerate(((CHANGED, "changed since the previous cycle"),
                                        (BAD, "red digit: differs from the target"))):
        y = c.height - 26 + 14 * k
        c.rect(left, y - 5, 10, 10, fill="#ffffff", stroke=stroke, width=1.5)
        c.text(left + 14, y, text, size=8.5, anchor="start")
    return c


def _xs(T: int, C: int) -> np.ndarray:
    """Positions of (step, cycle) on one axis: step t's cycles spread over (t, t+1]."""
    return np.array([t + (c + 1) / C for t in range(T) for c in range(C)])


def _flat(rows: list[list]) -> list:
    return [m for row in rows for m in row]


def _step_axis(ax, T: int):
    ax.set_xlim(0, T + 0.05)
    ax.set_xticks(range(1, T + 1))
    ax.set_xlabel("ACT step")


def figures(data: dict, params) -> list[Figure]:
    T, C, labels = data["steps"], len(data["cycles"]), data["cycles"]
    out = []
    s = data["sample"]
    if s is not None:
        steps, cycles = _shown_steps(T, params.max_steps), _shown_cycles(labels)
        drawing = draw_tokens(s, steps, cycles)
        key = symbol_key(drawing)
        shown = "every cycle" if len(cycles) == C else "the end of every H cycle (the L updates are in the data)"
        out.append(Figure(
            key="tokens",
            caption=(f"Puzzle {s['puzzle_index']}: the reverse embedding argmax(z·Eᵀ) of z_H (left) and z_L (right) "
                     f"after {shown}, ACT steps {', '.join(str(t + 1) for t in steps)} of {T}. The last column of "
                     f"each latent is the step's carry. Yellow outlines mark cells changed since the previous cycle "
                     f"(across steps, too); red digits differ from the target; grey cells are givens. Each title "
                     f"counts the cells equal to the target." + (f" Symbols: {key}." if key else "")),
            drawing=drawing, alt=f"Reverse-embedded z_H and z_L per cycle and step, puzzle {s['puzzle_index']}"))

    xs = _xs(T, C)
    fig, axes = mpl_figure(1, 2, size=(7.2, 2.7))
    ax = axes[0][0]
    metric_line(ax, xs, _flat(data["lens"]["H"]), color=ACCENT, label="lm_head(z_H)")
    metric_line(ax, xs, _flat(data["lens"]["L"]), color=BAD, label="lm_head(z_L)")
    ax.set_ylim(0, 1)
    ax.set_ylabel("blank-cell accuracy")
    _step_axis(ax, T)
    ax.legend(loc="best", fontsize=7)
    ax = axes[0][1]
    metric_line(ax, xs, _flat(data["agreement"]["H"]), color=ACCENT, label="z_H")
    metric_line(ax, xs, _flat(data["agreement"]["L"]), color=BAD, label="z_L")
    ax.set_ylim(0, 1)
    ax.set_ylabel("reverse embedding = lens")
    _step_axis(ax, T)
    ax.legend(loc="best", fontsize=7)
    out.append(Figure(
        key="lens",
        caption=(f"Logit lens over the evaluation set ({data['puzzles']} puzzles, {data['cells']} blank cells): left, "
                 f"the accuracy of lm_head applied to z_H and to z_L after every cycle ({', '.join(labels)}) of every "
                 f"ACT step (a step's cycles are spread before its tick; the tick is the step's carry); right, the "
                 f"fraction of the 81 cells whose reverse embedding argmax(z·Eᵀ) equals the "
                 f"lens readout. Bands: 95% Wilson intervals."),
        drawing=fig, alt="Logit-lens accuracy of z_H and z_L per cycle"))

    fig, axes = mpl_figure(1, 3, size=(9.6, 2.8))
    colors = {"solved": GOOD, "unsolved": BAD}
    ax = axes[0][0]
    for z, style in (("H", "-"), ("L", "--")):
        for g, col in colors.items():
            metric_line(ax, xs, _flat(data["delta"][z][g]), color=col, linestyle=style, label=f"z_{z}, {g}")
    ax.set_yscale("log")
    ax.set_ylabel("‖z_t − z_(t−1)‖ / ‖z_t‖")
    _step_axis(ax, T)
    ax.set_xlabel("ACT step")
    ax.legend(loc="best", fontsize=6)
    ax = axes[0][1]
    for g, col in colors.items():
        metric_line(ax, list(range(1, T + 1)), data["violations"][g], color=col, label=g)
    ax.set_ylabel("rule violations")
    ax.set_xlabel("ACT step")
    ax.set_xticks(range(1, T + 1))
    ax.legend(loc="best", fontsize=7)
    ax = axes[0][2]
    pts, ok = np.asarray(data["pca"]["points"]), np.asarray(data["pca"]["solved"], bool)
    for g, m in (("unsolved", ~ok), ("solved", ok)):
        for p in pts[m]:
            ax.plot(p[:, 0], p[:, 1], color=colors[g], lw=0.5, alpha=0.35)
        if m.any():
            ax.scatter(pts[m, -1, 0], pts[m, -1, 1], s=5, color=colors[g], label=f"{g} (last step)", zorder=3)
    if len(pts):
        ax.scatter(pts[:, 0, 0], pts[:, 0, 1], s=5, color=MUTED, marker="x", label="step 1", zorder=3)
    ev = data["pca"]["explained"]
    ax.set_xlabel(f"PC 1 ({ev[0]:.0%})")
    ax.set_ylabel(f"PC 2 ({ev[1]:.0%})")
    ax.legend(loc="best", fontsize=6)
    n_s = data["solved"]
    out.append(Figure(
        key="dynamics",
        caption=(f"Dynamics over the evaluation set, {n_s} puzzles solved at the last step and "
                 f"{data['puzzles'] - n_s} not. Left: relative change of z_H (solid) and z_L (dashed) at every cycle "
                 f"(the first against the initial carry), means with 95% bootstrap bands over puzzles. Middle: Sudoku "
                 f"rule violations of the predicted board after each step (extra copies of a digit in a row, column "
                 f"or box). Right: z_H averaged over the cells, projected on its first two principal components "
                 f"(SVD over all puzzles and steps, {len(pts)} puzzles), one line per puzzle from step 1 (×) to the "
                 f"last step (dot)."),
        drawing=fig, alt="Latent change per cycle, rule violations per step, PCA of z_H trajectories"))
    return out


def run_figure(items: list[tuple[str, dict]]) -> Figure | None:
    """Across a run, one point per checkpoint: the logit-lens accuracy of z_H and z_L at the carry, how much each
    latent still changes in the last cycle, and the rule violations of the last step's boards."""
    if len(items) < 2:
        return None
    labels = [lab for lab, _ in items]
    x = list(range(len(items)))
    sm = [d["summary"] for _, d in items]
    fig, ax = mpl_figure(1, 3, (7.0, 2.4))
    a, b, c = ax[0]
    metric_line(a, x, [s["z_H_lens_accuracy"] for s in sm], marker="o", ms=3, color=ACCENT, label="z_H")
    metric_line(a, x, [s["z_L_lens_accuracy"] for s in sm], marker="s", ms=3, color=CHANGED, label="z_L")
    a.set(ylabel="blank cells right", ylim=(-0.02, 1.02), title="(a) logit lens at the carry")
    a.legend(loc="best", fontsize=6.5)
    metric_line(b, x, [s["z_H_settling"] for s in sm], marker="o", ms=3, color=ACCENT, label="z_H")
    if all("z_L_settling" in s for s in sm):
        metric_line(b, x, [s["z_L_settling"] for s in sm], marker="s", ms=3, color=CHANGED, label="z_L")
    b.set(ylabel="relative change", ylim=(0, None), title="(b) change in the last cycle")
    b.legend(loc="best", fontsize=6.5)
    metric_line(c, x, [s["violations_last_step"] for s in sm], marker="o", ms=3, color=BAD)
    c.set(ylabel="violations per board", ylim=(0, None), title="(c) rule violations, last step")
    for axis in (a, b, c):
        axis.set_xticks(x, labels, rotation=30, ha="right", fontsize=7)
    return Figure("trend-recursion", (
        "The recursion across the run, one point per checkpoint in training order, over each report's evaluation "
        "puzzles: (a) the logit lens lm_head(z) on z_H (the model's answer) and on z_L after the last cycle of the "
        "last step, share of blank cells right (bands: 95% Wilson); (b) the relative change of each latent in that "
        "cycle (does the recursion settle as training goes on?); (c) the mean number of Sudoku rule violations "
        "(repeated digits in a row, column or box) of the last step's boards (bands: 95% bootstrap over puzzles)."),
        fig, alt="Logit-lens accuracy, settling and rule violations across checkpoints")
