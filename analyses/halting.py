"""Halting as a compute trade-off (seed 003: "does the model halt when it should?", answered with numbers).

At evaluation TRM runs every ACT step (halt_max_steps) and ignores its halting head; q_halt is the model's own
"I am done" signal (q_halt > 0, the rule training uses). This analysis asks what halting on it would have cost
or saved, over the evaluation set:

- a policy for each threshold τ on sigmoid(q_halt): each puzzle stops at the first step where sigmoid(q_halt) > τ
  (at the last step if it never does), and its answer is that step's board. τ = 0.5 is q_halt > 0; τ = 0 stops
  every puzzle at step 1, τ = 1 runs every step (the fixed-step evaluation). For each τ: the exact-solve rate
  (Wilson interval) and the mean ACT steps (bootstrap over puzzles). An oracle that stops at the first correct
  board bounds what any halting rule can reach;
- a reliability diagram: sigmoid(q_halt) in bins against the share of those (step, puzzle) pairs whose board is
  fully correct (the head's training target), with Wilson intervals, the expected calibration error (ECE) and
  the Brier score.

Everything is computed from the compact evaluation arrays (trace.eval: q_halt and solved, [T, N]).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from reportgen.figures import ACCENT, BAD, GOOD, INK, MUTED, Figure, metric_line, mpl_figure
from reportgen.stats import bootstrap_ratios, metric, proportion, reliability_bins, value

NAME = "halting"
TITLE = "Halting as a compute trade-off"
SUBJECTS = ("trm",)
USES_EVAL = True
METRICS = {
    "halting_solve_rate": ("solve, halting at q_halt>0", "pct"),
    "halting_mean_steps": ("steps, halting at q_halt>0", "num"),
    "q_halt_ece": ("q_halt ECE", "num"),
}


@dataclass
class Params:
    thresholds: int = 101  # τ on an even grid over [0, 1], both ends included (0.5, q_halt > 0, always among them)
    bins: int = 10  # bins of sigmoid(q_halt) in the reliability diagram

    def __post_init__(self):
        for k, lo in (("thresholds", 3), ("bins", 2)):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{k} must be an integer of at least {lo}, not {v!r}")
        if self.thresholds % 2 == 0:
            raise ValueError(f"thresholds must be odd so that the grid holds 0.5 (q_halt > 0), not {self.thresholds}")


def sigmoid(q: np.ndarray) -> np.ndarray:
    q = np.asarray(q, dtype=np.float64)
    return 0.5 * (1.0 + np.tanh(0.5 * q))  # = 1 / (1 + e^-q), without overflow for large |q|


def stop_steps(p: np.ndarray, tau: float) -> np.ndarray:
    """[N] 0-based step at which each puzzle stops under threshold τ: the first step with p > τ, else the last."""
    over = p > tau  # [T, N]
    return np.where(over.any(0), over.argmax(0), p.shape[0] - 1)


def compute(trace, params: Params) -> dict:
    ev = trace.eval
    T, N = ev.steps, ev.n
    solved = np.asarray(ev.solved, dtype=bool)  # [T, N]
    q = np.asarray(ev.q_halt, dtype=np.float64)
    p = sigmoid(q)
    taus = np.linspace(0.0, 1.0, params.thresholds)
    half = params.thresholds // 2  # index of τ = 0.5
    cols = np.arange(N)
    stops = np.stack([stop_steps(p, t) for t in taus])  # [G, N]
    ok = solved[stops, cols[None]]  # [G, N] board right where the puzzle stopped
    ever = solved.any(0)
    oracle_stop = np.where(ever, solved.argmax(0), T - 1)
    steps_rows = np.concatenate([stops + 1, (oracle_stop + 1)[None]]).astype(np.float64)
    mean_steps = bootstrap_ratios(steps_rows)  # one shared set of resamples over puzzles
    curve = []
    for g, tau in enumerate(taus):
        curve.append({"tau": round(float(tau), 6), "solve_rate": proportion(ok[g].sum(), N),
                      "mean_steps": mean_steps[g], "halted_early": proportion((stops[g] < T - 1).sum(), N)})
    fixed = {"solve_rate": proportion(solved[-1].sum(), N), "mean_steps": metric(float(T), N)}
    at_zero = curve[half]
    oracle = {"solve_rate": proportion(ever.sum(), N), "mean_steps": mean_steps[-1]}
    # the cheapest τ whose solve rate is at least the fixed-step evaluation's
    as_good = [c for c in curve if value(c["solve_rate"]) is not None and value(c["solve_rate"]) >= value(fixed["solve_rate"])]
    cheapest = min(as_good, key=lambda c: (value(c["mean_steps"]), c["tau"])) if as_good else None
    # puzzles whose board is right at some step and wrong at the last (stopping earlier would have kept them)
    lost = int((ever & ~solved[-1]).sum())
    # reliability of sigmoid(q_halt) as P(board fully correct), over all (step, puzzle) pairs
    pf, yf = p.ravel(), solved.ravel()
    bins, ece = reliability_bins(pf, yf, params.bins, mean_key="mean_p", rate_key="correct")
    brier = float(np.mean((pf - yf) ** 2)) if pf.size else None
    decisions = q > 0
    per_step = [{"step": t + 1, "halt_rate": proportion(decisions[t].sum(), N),
                 "stopped_here": proportion((stops[half] == t).sum(), N),
                 "solved": proportion(solved[t].sum(), N)} for t in range(T)]
    return {
        "puzzles": int(N),
        "steps": int(T),
        "curve": curve,
        "fixed": fixed,
        "at_q_halt_zero": at_zero,
        "oracle": oracle,
        "cheapest_as_good": cheapest,
        "solved_then_lost": lost,
        "per_step": per_step,
        "reliability": {"bins": bins, "pairs": int(pf.size), "ece": ece,
                        "brier": metric(brier, pf.size)},
        "summary": {
            "halting_solve_rate": at_zero["solve_rate"],
            "halting_mean_steps": at_zero["mean_steps"],
            "fixed_solve_rate": fixed["solve_rate"],
            "oracle_solve_rate": oracle["solve_rate"],
            "oracle_mean_steps": oracle["mean_steps"],
            "q_halt_ece": ece,
        },
    }


def metrics(data: dict) -> dict:
    s = data["summary"]
    return {k: s[k] for k in METRICS}


def _v(m):
    v = value(m)
    return np.nan if v is None else v


def figures(data: dict, params: Params) -> list[Figure]:
    T, N = data["steps"], data["puzzles"]
    fig, ax = mpl_figure(1, 2, (6.8, 2.9))
    a, b = ax[0]
    curve = data["curve"]
    xs = [_v(c["mean_steps"]) for c in curve]
    ys = [c["solve_rate"] for c in curve]
    order = np.argsort(xs, kind="stable")
    metric_line(a, [xs[i] for i in order], [ys[i] for i in order], color=ACCENT, lw=1.2,
                label="halt when sigmoid(q_halt) > τ")
    z, f, o = data["at_q_halt_zero"], data["fixed"], data["oracle"]
    a.plot([_v(z["mean_steps"])], [_v(z["solve_rate"])], "o", color=BAD, ms=6, zorder=5, label="q_halt > 0 (τ = 0.5)")
    a.plot([T], [_v(f["solve_rate"])], "s", color=INK, ms=5, zorder=5, label=f"fixed {T} steps (evaluation)")
    a.plot([_v(o["mean_steps"])], [_v(o["solve_rate"])], "^", color=GOOD, ms=6, zorder=5,
           label="oracle: stop at first correct board")
    for c in curve:  # a few τ values along the curve
        if any(math.isclose(c["tau"], t) for t in (0.1, 0.9, 0.99)) and value(c["mean_steps"]) is not None:
            a.annotate(f"τ={c['tau']:g}", (_v(c["mean_steps"]), _v(c["solve_rate"])), fontsize=6.5, color=MUTED,
                       xytext=(3, -9), textcoords="offset points")
    a.set(xlabel="mean ACT steps per puzzle", ylabel="exact-solve rate", xlim=(0.5, T + 0.5), ylim=(-0.02, 1.02),
          title="(a) accuracy against compute")
    a.legend(loc="best", fontsize=6.5)
    rel = data["reliability"]
    mids = [(bn["lo"] + bn["hi"]) / 2 for bn in rel["bins"]]
    xs_b = [bn["mean_p"] if bn["mean_p"] is not None else m for bn, m in zip(rel["bins"], mids)]
    b.plot([0, 1], [0, 1], color=MUTED, lw=0.8, ls="--", label="perfectly calibrated")
    metric_line(b, xs_b, [bn["correct"] for bn in rel["bins"]], marker="o", ms=3, color=ACCENT,
                label="share of boards correct")
    counts = np.array([bn["count"] for bn in rel["bins"]], dtype=np.float64)
    if counts.sum():
        w = [bn["hi"] - bn["lo"] for bn in rel["bins"]]
        b.bar([bn["lo"] for bn in rel["bins"]], counts / counts.sum(), width=w, align="edge", color=MUTED, alpha=0.25,
              label="share of (step, puzzle) pairs")
    b.set(xlabel="sigmoid(q_halt)", ylabel="fraction", xlim=(0, 1), ylim=(-0.02, 1.02),
          title=f"(b) reliability, ECE {_fmt(rel['ece'])}")
    b.legend(loc="upper left", fontsize=6.5)
    sm = data["summary"]
    f1 = Figure("tradeoff", (
        f"(a) If each of the {N} evaluation puzzles stopped at the first ACT step where sigmoid(q_halt) > τ (the last "
        f"step if never), its board there against the mean number of steps it took, for τ from 0 (stop at step 1) to "
        f"1 (run all {T} steps); band: 95% Wilson interval of the solve rate. Red: the model's own rule q_halt > 0, "
        f"{_pct(sm['halting_solve_rate'])} solved in {_fmt(sm['halting_mean_steps'])} steps on average; black: the "
        f"fixed-step evaluation, {_pct(sm['fixed_solve_rate'])}; green: an oracle that stops at the first correct "
        f"board, {_pct(sm['oracle_solve_rate'])} in {_fmt(sm['oracle_mean_steps'])} steps. (b) Reliability of "
        f"sigmoid(q_halt) as the probability that the board is fully correct, over all {rel['pairs']} (step, puzzle) "
        f"pairs in {len(rel['bins'])} bins (bands: 95% Wilson; grey bars: share of pairs per bin; a pair's steps are "
        f"not independent, so the intervals are narrower than a per-puzzle analysis would give)."), fig,
        alt="Exact-solve rate against mean ACT steps across halting thresholds, and a reliability diagram of q_halt")
    return [f1]


def _pct(m) -> str:
    v = value(m)
    return "–" if v is None else f"{100 * v:.1f}%"


def _fmt(m) -> str:
    v = value(m)
    return "–" if v is None else f"{v:.3g}"


def run_figure(items: list[tuple[str, dict]]) -> Figure | None:
    """Across a run: each checkpoint's exact-solve rate at the fixed steps and when halting on q_halt > 0, with
    the mean steps that halting takes, so a reader sees when the halting head becomes worth using."""
    if len(items) < 2:
        return None
    labels = [lab for lab, _ in items]
    x = list(range(len(items)))
    fig, ax = mpl_figure(1, 2, (6.6, 2.5))
    a, b = ax[0]
    metric_line(a, x, [d["fixed"]["solve_rate"] for _, d in items], marker="s", ms=3, color=INK,
                label="fixed steps")
    metric_line(a, x, [d["at_q_halt_zero"]["solve_rate"] for _, d in items], marker="o", ms=3, color=BAD,
                label="halting at q_halt > 0")
    metric_line(a, x, [d["oracle"]["solve_rate"] for _, d in items], marker="^", ms=3, color=GOOD, ls=":",
                label="oracle")
    a.set(ylabel="exact-solve rate", ylim=(-0.02, 1.02), title="(a) solve rate")
    a.legend(loc="best", fontsize=6.5)
    metric_line(b, x, [d["at_q_halt_zero"]["mean_steps"] for _, d in items], marker="o", ms=3, color=BAD,
                label="halting at q_halt > 0")
    b.plot(x, [d["steps"] for _, d in items], color=INK, lw=1, ls="--", label="fixed steps")
    b.set(ylabel="mean ACT steps", ylim=(0, 1.1 * max(d["steps"] for _, d in items)), title="(b) compute")
    b.legend(loc="best", fontsize=6.5)
    for axis in (a, b):
        axis.set_xticks(x, labels, rotation=30, ha="right", fontsize=7)
    return Figure("trend-halting", (
        "Halting across the run, one point per checkpoint in training order: (a) the exact-solve rate of the "
        "fixed-step evaluation, of stopping each puzzle at the first step with q_halt > 0, and of an oracle that "
        "stops at the first correct board (bands: 95% Wilson); (b) the mean ACT steps halting takes (band: "
        "bootstrap over puzzles) against the fixed number."), fig, alt="Solve rate and steps of halting across checkpoints")
