"""Solving statistics over the evaluation set (`--eval`, default the whole split), per ACT step: blank-cell
accuracy and exact-solve rate, cells changed, halting precision/recall (q_halt > 0 against "board fully
correct"), confidence of right and wrong cells, a calibration curve at the last step, steps to the first
correct board, and which cells the model revises most. They answer the questions at the end of seed 003:
how many steps a puzzle takes, which cells are refined, whether confidence tracks accuracy, and
whether the model halts when it should.

Every number is a metric dict of reportgen.stats with its n and a 95% interval: Wilson for the proportions
(accuracy over blank cells, solve and halting rates over puzzles), a bootstrap over puzzles for the means.
They are computed from the compact evaluation arrays (`trace.eval`, data/eval.npz), never from the drawn samples.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from reportgen.boards import Cell, board_height, draw_board
from reportgen.figures import ACCENT, BAD, CHANGED, GOOD, INK, MUTED, Canvas, Figure, metric_line, mix, mpl_figure
from reportgen.stats import bootstrap_mean, bootstrap_ratios, metric, proportion, reliability_bins, value

NAME = "solving_stats"
# headline metrics: label on the index page, summary.md and run overview, and how the value reads
METRICS = {"blank_accuracy": ("blank-cell acc.", "pct"), "exact_solve_rate": ("exact solve", "pct"),
           "mean_steps_to_first_correct": ("steps to solve", "num"), "halt_precision": ("halt precision", "pct"),
           "halt_recall": ("halt recall", "pct")}
TITLE = "Solving statistics"
SUBJECTS = ("trm",)
USES_EVAL = True  # reads trace.eval: the probe runs the evaluation pass for it


@dataclass
class Params:
    calibration_bins: int = 10

    def __post_init__(self):
        if self.calibration_bins < 2:
            raise ValueError("calibration_bins must be at least 2")


def compute(trace, params: Params) -> dict:
    ev = trace.eval
    T, N = ev.steps, ev.n
    blanks = ev.blanks.astype(np.int64)
    cells = int(blanks.sum())
    solved, halt = ev.solved, ev.q_halt > 0  # [T, N]
    wrong = blanks[None] - ev.correct_blank  # [T, N] wrong blank cells
    # the means, all steps in one bootstrap over puzzles: cells changed (from step 2), mean q_halt,
    # mean confidence of the right and of the wrong blank cells
    means = bootstrap_ratios(np.concatenate([ev.changed[1:], ev.q_halt, ev.confidence_right, ev.confidence_wrong]),
                             np.concatenate([np.ones((2 * T - 1, N)), ev.correct_blank, wrong]))
    changed, q_halt, conf_right, conf_wrong = means[:T - 1], means[T - 1:2 * T - 1], means[2 * T - 1:3 * T - 1], means[3 * T - 1:]
    per_step = []
    for t in range(T):
        tp = int((halt[t] & solved[t]).sum())
        per_step.append({
            "step": t + 1,
            "blank_accuracy": proportion(ev.correct_blank[t].sum(), cells),
            "exact_solve_rate": proportion(solved[t].sum(), N),
            "cells_changed": changed[t - 1] if t else metric(None, 0, interval="bootstrap"),
            "mean_q_halt": q_halt[t],
            "halt_rate": proportion(halt[t].sum(), N),
            "halt_precision": proportion(tp, halt[t].sum()),
            "halt_recall": proportion(tp, solved[t].sum()),
            "confidence_correct": conf_right[t],
            "confidence_wrong": conf_wrong[t],
        })
    # calibration at the last step over blank cells
    cf, ok = ev.confidence_last[ev.blank], ev.correct_last[ev.blank]
    bins, ece = reliability_bins(cf, ok, params.calibration_bins)
    ever = solved.any(0)
    first = np.where(ever, solved.argmax(0) + 1, 0)  # [N] first step with a fully correct board, 0: never
    hist = {str(s): int((first == s).sum()) for s in range(1, T + 1)}
    hist["never"] = int((~ever).sum())
    # how often each cell changes across the steps, averaged over the puzzles in which it is blank
    n_blank = ev.blank.sum(0)
    cell_changes = np.where(n_blank > 0, (ev.cell_changes * ev.blank).sum(0) / np.maximum(n_blank, 1), np.nan)
    last = per_step[-1]
    info = getattr(ev, "info", None) or {}
    by_candidates = []
    cand = getattr(ev, "candidates", None)  # [N, 81] digits each blank cell could hold given the clues
    if cand is not None:
        ks = [k for k in range(1, 10) if ((cand == k) & ev.blank).any()]
        masks = [(cand == k) & ev.blank for k in ks]  # [N, 81] each
        revisions = bootstrap_ratios(np.stack([(ev.cell_changes * m).sum(1) for m in masks]),
                                     np.stack([m.sum(1) for m in masks])) if ks else []
        for k, m, rev in zip(ks, masks, revisions):
            n = int(m.sum())
            by_candidates.append({"candidates": k, "cells": n, "puzzles": int(m.any(1).sum()),
                                  "accuracy": proportion((ev.correct_last & m).sum(), n), "revisions": rev})
    return {
        "puzzles": int(N),
        "cells": cells,
        "steps": int(T),
        "evaluation": {"puzzles": int(N), **info},
        "per_step": per_step,
        "calibration": {"bins": bins, "ece": ece, "cells": int(cf.size)},
        "first_correct_histogram": hist,
        "cell_changes": [None if np.isnan(v) else round(float(v), 5) for v in cell_changes],
        "by_candidates": by_candidates,
        "halting_last_step": {
            "true_positive": int((halt[-1] & solved[-1]).sum()),
            "false_positive": int((halt[-1] & ~solved[-1]).sum()),
            "false_negative": int((~halt[-1] & solved[-1]).sum()),
            "true_negative": int((~halt[-1] & ~solved[-1]).sum()),
        },
        "summary": {
            "blank_accuracy": last["blank_accuracy"],
            "exact_solve_rate": last["exact_solve_rate"],
            "mean_steps_to_first_correct": bootstrap_mean(first[ever]),
            "cells_changed_last_step": last["cells_changed"],
            "halt_precision": last["halt_precision"],
            "halt_recall": last["halt_recall"],
        },
    }


def metrics(data: dict) -> dict:
    return dict(data["summary"])


def _nan(v):
    v = value(v)
    return np.nan if v is None else v


def _errorbar(ax, xs, metrics: list):
    """Bars (or points) with their 95% interval as error bars."""
    ys = [_nan(m) for m in metrics]
    err = [[max(0.0, y - m["lo"]) if m.get("lo") is not None else 0.0 for y, m in zip(ys, metrics)],
           [max(0.0, m["hi"] - y) if m.get("hi") is not None else 0.0 for y, m in zip(ys, metrics)]]
    ax.errorbar(xs, ys, yerr=err, fmt="none", ecolor=INK, elinewidth=0.6, capsize=1.5)


def _step_ticks(*axes):
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(nbins=10, integer=True))


def figures(data: dict, params: Params) -> list[Figure]:
    ps = data["per_step"]
    steps = [p["step"] for p in ps]
    T = data["steps"]

    fig, ax = mpl_figure(1, 2, (6.6, 2.5))
    a, b = ax[0]
    metric_line(a, steps, [p["blank_accuracy"] for p in ps], marker="o", ms=3, color=ACCENT, label="blank-cell accuracy")
    metric_line(a, steps, [p["exact_solve_rate"] for p in ps], marker="s", ms=3, color=GOOD, label="exact-solve rate")
    a.set(xlabel="ACT step", ylabel="fraction", ylim=(-0.02, 1.02), title="(a) accuracy per step")
    a.legend(loc="best")
    b.bar(steps[1:], [_nan(p["cells_changed"]) for p in ps[1:]], color=CHANGED, edgecolor="#9a6700", linewidth=0.5)
    _errorbar(b, steps[1:], [p["cells_changed"] for p in ps[1:]])
    b.set(xlabel="ACT step", ylabel="cells changed per puzzle", title="(b) cells revised since previous step")
    _step_ticks(a, b)
    f1 = Figure("accuracy", (
        f"Accuracy and revisions per ACT step over the {data['puzzles']} evaluation puzzles ({data['cells']} blank "
        "cells). (a) Fraction of blank cells predicted correctly and fraction of boards fully correct after each "
        "step; bands: 95% Wilson intervals. (b) Mean number of cells whose prediction changed from the previous "
        "step (error bars: 95% bootstrap intervals over puzzles): a model that has settled stops revising."), fig,
        alt="Line plot of accuracy per step and bar chart of cells changed per step")

    fig, ax = mpl_figure(1, 2, (6.6, 2.6))
    a, b = ax[0]
    cal = [x for x in data["calibration"]["bins"] if x["count"]]
    a.plot([0, 1], [0, 1], color=MUTED, lw=0.8, ls="--", label="perfect calibration")
    a.plot([x["mean_confidence"] for x in cal], [value(x["accuracy"]) for x in cal], marker="o", ms=3, color=ACCENT,
           label="model")
    _errorbar(a, [x["mean_confidence"] for x in cal], [x["accuracy"] for x in cal])
    for x in cal:
        a.annotate(str(x["count"]), (x["mean_confidence"], value(x["accuracy"])), fontsize=6, color=MUTED,
                   xytext=(2, -7), textcoords="offset points")
    ece = value(data["calibration"]["ece"])
    a.set(xlabel="confidence (max softmax)", ylabel="accuracy", xlim=(0, 1.02), ylim=(-0.02, 1.02),
          title=f"(a) calibration at step {T}" + (f", ECE {ece:.3f}" if ece is not None else ""))
    a.legend(loc="upper left")
    metric_line(b, steps, [p["confidence_correct"] for p in ps], marker="o", ms=3, color=GOOD, label="correct cells")
    metric_line(b, steps, [p["confidence_wrong"] for p in ps], marker="o", ms=3, color=BAD, label="wrong cells")
    b.set(xlabel="ACT step", ylabel="mean confidence", ylim=(-0.02, 1.02), title="(b) confidence of right and wrong cells")
    b.legend(loc="best")
    _step_ticks(b)
    f2 = Figure("confidence", (
        "Does confidence track accuracy? (a) Reliability diagram of the blank cells after the last step: cells are "
        f"binned by confidence and each point gives the bin's accuracy (numbers: cells per bin, of "
        f"{data['calibration']['cells']}; error bars: 95% Wilson intervals); points under the diagonal are "
        "over-confident. ECE is the count-weighted mean gap. (b) Mean confidence of correct and of wrong blank cells "
        "at each step (bands: 95% bootstrap intervals over puzzles)."), fig, alt="Reliability diagram and confidence per step")

    fig, ax = mpl_figure(1, 2, (6.6, 2.5))
    a, b = ax[0]
    metric_line(a, steps, [p["halt_precision"] for p in ps], marker="o", ms=3, color=ACCENT, label="precision")
    metric_line(a, steps, [p["halt_recall"] for p in ps], marker="s", ms=3, color=GOOD, label="recall")
    a.plot(steps, [_nan(p["halt_rate"]) for p in ps], color=MUTED, lw=1, ls=":", label="share halting")
    a.set(xlabel="ACT step", ylabel="fraction", ylim=(-0.02, 1.02), title="(a) halting signal q_halt > 0")
    a.legend(loc="best")
    _step_ticks(a)
    h = data["first_correct_histogram"]
    keys = list(h)
    b.bar(range(len(keys)), [h[k] for k in keys], color=[ACCENT] * (len(keys) - 1) + [BAD])
    b.set_xticks(range(len(keys)), keys if len(keys) <= 17 else [k if i % 2 == 0 or k == "never" else "" for i, k in enumerate(keys)])
    b.set(xlabel="first step with a fully correct board", ylabel="puzzles", title="(b) steps to solve")
    b.yaxis.get_major_locator().set_params(integer=True)
    f3 = Figure("halting", (
        "Does the model halt when it should? (a) Precision: of the puzzles whose q_halt > 0 at a step, the share "
        "whose board is fully correct; recall: of the fully correct boards, the share with q_halt > 0 (bands: 95% "
        f"Wilson intervals; gaps: no puzzle in the denominator). (b) Number of the {data['puzzles']} puzzles by the "
        "first ACT step at which the board is fully correct ('never': not solved within the steps run)."), fig, alt="Halting precision and recall, steps to solve")

    figs = [f1, f2, f3]
    ch = data["cell_changes"]
    vals = [v for v in ch if v is not None]
    top = max(vals) if vals else 0.0
    cell = 22
    c = Canvas(9 * cell + 8 + 150, board_height(cell, 1) + 8)
    cells = []
    for v in ch:
        if v is None:
            cells.append(Cell("", fill="#f6f8fa"))
        else:
            t = v / top if top > 0 else 0.0
            cells.append(Cell(f"{v:.1f}", fill=mix("#ffffff", CHANGED, t), color=INK))
    draw_board(c, 4, 4, cells, cell=cell, title="mean revisions per cell", font_scale=0.4)
    c.text(9 * cell + 16, 40, f"max {top:.2f} revisions", size=9, anchor="start")
    c.text(9 * cell + 16, 56, "blank in no puzzle: grey", size=9, anchor="start", fill=MUTED)
    figs.append(Figure("cell-revisions", (
        f"Which cells does the model refine most? Mean number of times each cell's prediction changed over the "
        f"{T} ACT steps, averaged over the evaluation puzzles in which the cell is blank (darker = revised more)."), c,
        alt="Sudoku board heat map of revisions per cell"))
    bc = data.get("by_candidates") or []
    if bc:
        fig, ax = mpl_figure(1, 2, (6.6, 2.4))
        a, b = ax[0]
        ks = [r["candidates"] for r in bc]
        metric_line(a, ks, [r["accuracy"] for r in bc], marker="o", ms=3, color=ACCENT)
        a.set(xlabel="candidates of the blank cell", ylabel="accuracy", ylim=(-0.02, 1.02), xticks=ks,
              title=f"(a) accuracy after step {T}")
        metric_line(b, ks, [r["revisions"] for r in bc], marker="s", ms=3, color=CHANGED)
        b.set(xlabel="candidates of the blank cell", ylabel="revisions", xticks=ks, ylim=(0, None),
              title="(b) mean revisions over the steps")
        figs.append(Figure("by-candidates", (
            f"Which blank cells are hard? Blank cells grouped by their number of candidates in the puzzle (digits that no "
            f"clue in the cell's row, column or box rules out; 1: the clues alone decide it): (a) share predicted right "
            f"after the last step (band: 95% Wilson over cells), (b) mean number of times the prediction changed over "
            f"the {T} steps (band: 95% bootstrap over puzzles)."), fig,
            alt="Accuracy and revisions of blank cells by their number of candidates"))
    return figs
