"""Halting as a compute trade-off, and which cells are hard (candidates per blank cell), on hand-checkable
evaluation arrays and on a real report of the shipped example."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from analyses import halting, solving_stats  # noqa: E402
from reportgen.probes.trm import EvalSet, candidates  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


class Trace:  # what an analysis reads: the evaluation arrays
    def __init__(self, ev):
        self.eval = ev


def evalset(q_halt, solved):
    q = np.asarray(q_halt, dtype=np.float32).T  # given per puzzle, stored [T, N]
    s = np.asarray(solved, dtype=bool).T
    T, N = s.shape
    return EvalSet(arrays={"q_halt": q, "solved": s})


# four puzzles over four ACT steps; q_halt crosses zero at known steps
Q = [[-2, 1, 3, 3],      # halts at step 2 (q_halt > 0 first there), solved from step 2
     [-1, -1, -1, -1],   # never halts: runs all 4 steps, solved only at step 4
     [0.5, 0.5, 0.5, 0.5],  # halts at step 1, where the board is wrong; solved from step 3
     [-5, -5, -5, -5]]   # never halts; right at step 2 only, lost by the last
S = [[0, 1, 1, 1],
     [0, 0, 0, 1],
     [0, 0, 1, 1],
     [0, 1, 0, 0]]


def test_halting_on_known_crossings():
    d = halting.compute(Trace(evalset(Q, S)), halting.Params())
    z = d["at_q_halt_zero"]
    assert z["tau"] == 0.5
    assert z["solve_rate"]["value"] == pytest.approx(2 / 4)  # puzzles 0 and 1
    assert z["mean_steps"]["value"] == pytest.approx((2 + 4 + 1 + 4) / 4)
    assert z["halted_early"]["value"] == pytest.approx(2 / 4)
    assert d["fixed"]["solve_rate"]["value"] == pytest.approx(3 / 4)
    assert d["oracle"]["solve_rate"]["value"] == 1.0
    assert d["oracle"]["mean_steps"]["value"] == pytest.approx((2 + 4 + 3 + 2) / 4)
    assert d["solved_then_lost"] == 1
    # the ends of the curve: τ = 0 stops everything at step 1, τ = 1 is the fixed-step evaluation
    assert d["curve"][0]["mean_steps"]["value"] == 1 and d["curve"][0]["solve_rate"]["value"] == 0
    assert d["curve"][-1]["mean_steps"]["value"] == 4
    assert d["curve"][-1]["solve_rate"]["value"] == d["fixed"]["solve_rate"]["value"]
    # as good as the fixed steps and cheapest: τ just above sigmoid(0.5) = 0.6225 keeps puzzle 2 running and
    # still stops puzzle 0 at step 2 (sigmoid(1) = 0.731)
    cg = d["cheapest_as_good"]
    assert cg["tau"] == pytest.approx(0.63) and cg["mean_steps"]["value"] == pytest.approx((2 + 4 + 4 + 4) / 4)
    assert [r["stopped_here"]["value"] for r in d["per_step"]] == pytest.approx([1 / 4, 1 / 4, 0, 2 / 4])
    assert d["reliability"]["pairs"] == 16 and sum(b["count"] for b in d["reliability"]["bins"]) == 16
    m = halting.metrics(d)
    assert set(m) == set(halting.METRICS) and m["halting_solve_rate"] == z["solve_rate"]


def test_reliability_of_a_sure_and_of_a_backwards_head():
    solved = [[0, 0, 1, 1], [0, 1, 1, 1], [0, 0, 0, 0]]
    right = [[20.0 if s else -20.0 for s in row] for row in solved]
    d = halting.compute(Trace(evalset(right, solved)), halting.Params())
    assert d["reliability"]["ece"]["value"] == pytest.approx(0, abs=1e-6)
    assert d["reliability"]["brier"]["value"] == pytest.approx(0, abs=1e-6)
    assert d["summary"]["halting_solve_rate"]["value"] == pytest.approx(2 / 3)  # halts at the first solved step
    assert d["summary"]["halting_mean_steps"]["value"] == pytest.approx((3 + 2 + 4) / 3)
    wrong = [[-v for v in row] for row in right]
    d = halting.compute(Trace(evalset(wrong, solved)), halting.Params())
    assert d["reliability"]["ece"]["value"] == pytest.approx(1, abs=1e-6)


def test_halting_params_are_validated():
    with pytest.raises(ValueError, match="odd"):
        halting.Params(thresholds=100)
    with pytest.raises(ValueError, match="bins"):
        halting.Params(bins=1)


def test_candidates_of_a_known_board():
    x = np.ones((1, 81), dtype=np.int32)  # all blank ...
    x[0, :8] = np.arange(1, 9) + 1        # ... but digits 1-8 along the first row
    c = candidates(x).reshape(9, 9)
    assert c[0, :8].tolist() == [0] * 8   # clues have none
    assert c[0, 8] == 1                   # only 9 is left in that row
    assert c[1, 0] == 6                   # box 0 holds 1, 2, 3 (column 0's 1 is among them)
    assert c[4, 4] == 8                   # column 4 holds 5
    assert c[8, 8] == 9                   # no clue in its row, column (the (0, 8) cell is blank) or box
    empty = candidates(np.ones((1, 81), dtype=np.int32))
    assert (empty == 9).all()


def test_accuracy_and_revisions_by_candidates():
    """Two puzzles: blank cells with 1 candidate always right and never revised, those with more wrong and revised."""
    rng = np.random.default_rng(0)
    inputs = np.ones((2, 81), dtype=np.int32)
    inputs[:, :8] = np.arange(1, 9) + 1
    cand = candidates(inputs)
    blank = inputs == 1
    easy = cand == 1
    T = 3
    correct_last = ~blank | easy
    cell_changes = np.where(blank & ~easy, 2, 0).astype(np.int16)
    arrays = {"blank": blank, "blanks": blank.sum(1).astype(np.int16), "candidates": cand,
              "correct_last": correct_last, "cell_changes": cell_changes,
              "confidence_last": rng.random((2, 81)).astype(np.float32),
              "correct_blank": np.tile((correct_last & blank).sum(1), (T, 1)).astype(np.int16),
              "solved": np.zeros((T, 2), bool), "changed": np.zeros((T, 2), np.int16),
              "q_halt": np.zeros((T, 2), np.float32), "confidence_right": np.zeros((T, 2), np.float32),
              "confidence_wrong": np.zeros((T, 2), np.float32)}
    d = solving_stats.compute(Trace(EvalSet(arrays=arrays)), solving_stats.Params())
    by = {r["candidates"]: r for r in d["by_candidates"]}
    assert by[1]["cells"] == 2 and by[1]["accuracy"]["value"] == 1 and by[1]["revisions"]["value"] == 0
    assert sum(r["cells"] for r in d["by_candidates"]) == int(blank.sum())
    for k, r in by.items():
        if k > 1:
            assert r["accuracy"]["value"] == 0 and r["revisions"]["value"] == 2


def test_report_shows_halting_and_hard_cells(tmp_path):
    """On the shipped example: the halting section's numbers recomputed from the report's own data/eval.npz."""
    from test_build import build

    out = tmp_path / "site"
    r = build("--ckpt", ROOT / "examples/sudoku/checkpoints/trm_sudoku_easy/step_1200", "--out", out, "--eval", 40,
              "--samples", 1, "--format", "html", "--only", "solving_stats,halting")
    assert r.exit_code == 0, r.output
    rep = out / "trm_sudoku_easy" / "step_1200"
    html = (rep / "index.html").read_text()
    assert 'id="halting"' in html and "Halting as a compute trade-off" in html and "candidates" in html
    data = json.loads((rep / "data" / "halting.json").read_text())
    with np.load(rep / "data" / "eval.npz") as z:
        q, solved, cand, blank = z["q_halt"], z["solved"], z["candidates"], z["blank"]
    T, N = solved.shape
    assert N == 40 and data["steps"] == T
    stop = np.array([next((t for t in range(T) if q[t, n] > 0), T - 1) for n in range(N)])
    assert data["summary"]["halting_solve_rate"]["value"] == pytest.approx(solved[stop, np.arange(N)].mean())
    assert data["summary"]["halting_mean_steps"]["value"] == pytest.approx((stop + 1).mean())
    assert ((cand > 0) == blank).all() and cand.max() <= 9
    stats = json.loads((rep / "data" / "solving_stats.json").read_text())
    assert sum(r["cells"] for r in stats["by_candidates"]) == stats["cells"]
    assert math.isfinite(data["reliability"]["ece"]["value"])
    assert len(list((rep / "figures").glob("*-halting-1.svg"))) == 1
    assert len(list((rep / "figures").glob("*-solving_stats-*.svg"))) == 5  # + accuracy/revisions by candidates
