"""The recursion inside each ACT step, cycle by cycle (seed 003's option 2): z_H and z_L after every H cycle
(or, with `--param recursion.cycles=L`, after every update of either latent), read three ways:

- tokenized: the reverse embedding argmax(z·Eᵀ) of each cell, for one drawn puzzle, cycles × steps;
- a logit lens: lm_head applied to z_H and to z_L at every cycle, its accuracy over the blank cells of the
  evaluation set, and how often the reverse embedding agrees with the lens (where the answer forms; whether z_L
  carries it);
- dynamics: the relative change ‖z_t − z_{t−1}‖/‖z_t‖ at every cycle (does the latent settle?), the Sudoku rule
  violations of the predicted board per step, each for the puzzles solved at the last step against the rest,
  and a 2-D projection (PCA by SVD) of z_H's cell-mean trajectory over the steps, coloured by outcome.

The probe's `cycles` option is this analysis' parameter (a `trm` table of probe options does not exist in
the analysis-params mechanism). Statistics run over the evaluation set (trace.eval, CYCLE_EVAL_ARRAYS of
reportgen/probes/trm_cycles.py), with Wilson intervals for accuracies and bootstrap intervals over puzzles for
means; the token figure reads the drawn puzzles' full trace.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from reportgen.stats import bootstrap_ratios, metric, proportion

NAME = "recursion"
TITLE = "Recursion, cycle by cycle"
SUBJECTS = ("trm",)
USES_EVAL = True
NEEDS_CYCLES = True  # the TRM kind runs the probe with cycles=params.cycles for this analysis
METRICS = {
    "z_L_lens_accuracy": ("z_L lens acc.", "pct"),
    "z_H_settling": ("z_H change, last", "num"),
    "violations_last_step": ("rule violations", "num"),
}


@dataclass
class Params:
    cycles: str = "H"  # H: after every H cycle; L: after every update (L_cycles z_L updates, then z_H, per H cycle)
    sample: int = 0  # which drawn puzzle the token figure shows
    max_steps: int = 8  # ACT steps the token figure shows at most (first and last always)

    def __post_init__(self):
        if self.cycles not in ("H", "L"):
            raise ValueError(f"cycles must be H or L, not {self.cycles!r}")
        if self.sample < 0 or self.max_steps < 2:
            raise ValueError("sample must be >= 0 and max_steps >= 2")


def needs(params: Params) -> dict:
    return {"cycles": params.cycles}


def cycle_labels(update) -> list[str]:
    """Names of the cycles of one step: 'H1', 'H2', … for z_H updates, 'L1.1', … for the z_L updates inside H
    cycle 1."""
    out, h, l = [], 1, 1
    for u in update:
        if u:
            out.append(f"H{h}")
            h, l = h + 1, 1
        else:
            out.append(f"L{h}.{l}")
            l += 1
    return out


def pca2(x: np.ndarray) -> tuple[np.ndarray, list[float]]:
    """Rows of x [M, D] projected on their first two principal components (SVD of the centred rows), and the
    fraction of variance each explains."""
    xc = x - x.mean(0, keepdims=True)
    u, s, vt = np.linalg.svd(xc, full_matrices=False)
    var = s ** 2
    frac = (var[:2] / var.sum()).tolist() if var.sum() > 0 else [0.0, 0.0]
    return xc @ vt[:2].T, [float(f) for f in frac]


def _group_means(x: np.ndarray, groups: dict) -> dict:
    """x [K, N]: per group (a bool mask over N), the mean of each row over the group's puzzles, with bootstrap
    intervals."""
    out = {}
    for g, m in groups.items():
        k = x.shape[0]
        out[g] = bootstrap_ratios(x[:, m], np.ones((k, int(m.sum())))) if m.any() else [metric(None, 0)] * k
    return out


def compute(trace, params: Params) -> dict:
    ev = trace.eval
    if ev is None or "lens_H_correct" not in ev.arrays:
        raise ValueError("the recursion analysis needs the per-cycle evaluation arrays (probe run with cycles)")
    T, C, N = ev.lens_H_correct.shape
    update = ev.cycle_update.tolist()
    labels = cycle_labels(update)
    cells = int(ev.blanks.astype(np.int64).sum())
    solved = ev.solved[-1]
    groups = {"solved": solved, "unsolved": ~solved}
    lens = {z: [[proportion(ev.arrays[f"lens_{z}_correct"][t, c].sum(), cells) for c in range(C)] for t in range(T)]
            for z in ("H", "L")}
    agree = {z: [[proportion(ev.arrays[f"rev_lens_{z}"][t, c].sum(), 81 * N) for c in range(C)] for t in range(T)]
             for z in ("H", "L")}
    delta = {}
    for z in ("H", "L"):
        d = _group_means(ev.arrays[f"delta_{z}"].reshape(T * C, N).astype(np.float64), groups)
        delta[z] = {g: [v[t * C:(t + 1) * C] for t in range(T)] for g, v in d.items()}
    viol = _group_means(ev.violations.astype(np.float64), groups)
    # PCA of z_H's cell mean over the steps, all puzzles and steps together (at most 400 puzzles drawn)
    show = np.arange(min(N, 400))
    pts, frac = pca2(ev.z_H_mean[:, show].astype(np.float64).transpose(1, 0, 2).reshape(len(show) * T, -1))
    pts = pts.reshape(len(show), T, 2)
    sample = _sample(trace, params, labels)
    last = (T - 1, C - 1)
    return {
        "puzzles": int(N), "cells": cells, "steps": int(T), "cycles": labels, "mode": params.cycles,
        "solved": int(solved.sum()),
        "lens": lens, "agreement": agree, "delta": delta, "violations": viol,
        "pca": {"explained": frac, "solved": solved[show].tolist(),
                "points": np.round(pts, 5).tolist()},
        "sample": sample,
        "summary": {
            "z_L_lens_accuracy": lens["L"][last[0]][last[1]],
            "z_H_lens_accuracy": lens["H"][last[0]][last[1]],
            "z_H_settling": bootstrap_ratios(ev.delta_H[-1, -1][None].astype(np.float64))[0],
            "z_L_settling": bootstrap_ratios(ev.delta_L[-1, -1][None].astype(np.float64))[0],
            "violations_last_step": bootstrap_ratios(ev.violations[-1][None].astype(np.float64))[0],
        },
    }


def _sample(trace, params: Params, labels: list[str]) -> dict | None:
    """One drawn puzzle's reverse-embedded z_H and z_L and their lens readouts per step and cycle."""
    if "z_H_cycle_tokens" not in trace.arrays or trace.n == 0:
        return None
    i = min(params.sample, trace.n - 1)
    T = trace.steps
    out = {"puzzle_index": int(trace.puzzle_index[i]), "inputs": trace.inputs[i].tolist(),
           "labels": trace.labels[i].tolist(), "cycles": labels}
    for z in ("H", "L"):
        out[f"z_{z}_tokens"] = trace.arrays[f"z_{z}_cycle_tokens"][:, :, i].tolist()  # [T][C][81]
        out[f"z_{z}_lens"] = trace.arrays[f"z_{z}_lens"][:, :, i].tolist()
    out["steps"] = int(T)
    return out


def metrics(data: dict) -> dict:
    s = data["summary"]
    return {k: s[k] for k in METRICS}


def figures(data: dict, params: Params) -> list:
    from .recursion_figures import figures as draw

    return draw(data, params)


def run_figure(items: list[tuple[str, dict]]):
    from .recursion_figures import run_figure as draw

    return draw(items)
