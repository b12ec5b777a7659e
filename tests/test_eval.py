"""Metrics over the evaluation set (--eval), apart from the drawn samples (--samples): they equal a direct
computation on the full trace of the same puzzles, do not depend on the batch size or on --samples, and every
page and file that shows them carries n and a 95% interval."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from analyses import solving_stats, sudoku_latents
from reportgen.cli import main
from reportgen.stats import bootstrap_mean, bootstrap_ratios, value

ROOT = Path(__file__).resolve().parents[1]
CKPT = ROOT / "examples/sudoku/checkpoints/trm_sudoku_easy/step_1200"
DATA = ROOT / "examples/sudoku/data/sudoku-easy-2400-aug-0"
needs_example = pytest.mark.skipif(not CKPT.is_file(), reason="example checkpoint not in this checkout")


def build(*args):
    return CliRunner().invoke(main, ["build", "-q", *map(str, args)], catch_exceptions=False)


def example_subject():
    from reportgen.checkpoints import discover, load_trm, read_run_config, read_state_dict, strip_trm_prefixes
    from reportgen.data.puzzles import read_split

    ref = discover([str(CKPT)])[0]
    run_config, config_path = read_run_config(ref.path)
    split = read_split(DATA, "test")
    return load_trm(ref, strip_trm_prefixes(read_state_dict(ref.path)), run_config, config_path, split.meta,
                    "float32"), split


@pytest.fixture(scope="module")
def eval20(tmp_path_factory):
    """The example checkpoint built with 2 drawn puzzles and 20 evaluated, and again with 5 drawn."""
    out = tmp_path_factory.mktemp("eval20")
    for samples, name in ((2, "a"), (5, "b")):
        r = build("--ckpt", CKPT, "--data", DATA, "--out", out / name, "--samples", samples, "--eval", 20,
                  "--format", "html", "--only", "solving_stats,sudoku_latents")
        assert r.exit_code == 0, r.output
    return out


def _direct(tr):
    """The statistics of solving_stats, computed plainly from a full trace (every cell of every step)."""
    preds, labels, inputs, conf, qh = tr.preds, tr.labels, tr.inputs, tr.confidence, tr.q_halt
    correct = preds == labels[None]
    blank = np.broadcast_to(inputs == 1, correct.shape)
    solved, halt = correct.all(-1), qh > 0
    rows = []
    for t in range(tr.steps):
        b, c = blank[t], correct[t]
        rows.append({
            "blank_accuracy": (c[b].mean(), int(b.sum())),
            "exact_solve_rate": (solved[t].mean(), tr.n),
            "cells_changed": ((preds[t] != preds[t - 1]).sum(-1).mean(), tr.n) if t else (None, 0),
            "mean_q_halt": (qh[t].mean(), tr.n),
            "halt_rate": (halt[t].mean(), tr.n),
            "halt_precision": ((halt[t] & solved[t]).sum() / halt[t].sum() if halt[t].any() else None, int(halt[t].sum())),
            "halt_recall": ((halt[t] & solved[t]).sum() / solved[t].sum() if solved[t].any() else None, int(solved[t].sum())),
            "confidence_correct": (conf[t][b & c].mean(), int((b & c).sum())),
            "confidence_wrong": (conf[t][b & ~c].mean(), int((b & ~c).sum())),
        })
    first = [int(np.flatnonzero(solved[:, i])[0]) + 1 for i in range(tr.n) if solved[:, i].any()]
    changes = (preds[1:] != preds[:-1]).sum(0)
    nb = (inputs == 1).sum(0)
    cell_changes = [(changes[:, k] * (inputs[:, k] == 1)).sum() / nb[k] if nb[k] else None for k in range(81)]
    cf, ok = conf[-1][inputs == 1], correct[-1][inputs == 1]
    zh = (tr.z_H_tokens[-1] == labels).sum()
    return rows, first, cell_changes, (cf, ok), zh


@needs_example
def test_eval_metrics_equal_a_direct_computation_on_the_full_trace(eval20):
    from reportgen.probes.trm import probe_trm

    subject, split = example_subject()
    tr = probe_trm(subject, split.inputs[:20], split.labels[:20], split.puzzle_identifiers[:20], np.arange(20), "cpu")
    rows, first, cell_changes, (cf, ok), zh = _direct(tr)
    rep = eval20 / "a/trm_sudoku_easy/step_1200"
    st = json.loads((rep / "data/solving_stats.json").read_text())
    assert st["puzzles"] == 20 and st["cells"] == int((tr.inputs == 1).sum())
    for got, want in zip(st["per_step"], rows):
        for k, (v, n) in want.items():
            assert got[k]["n"] == n, k
            assert (got[k]["value"] is None) == (v is None), k
            if v is not None:
                assert got[k]["value"] == pytest.approx(float(v), rel=1e-5, abs=1e-6), k
                assert got[k]["lo"] <= got[k]["value"] + 1e-12 and got[k]["value"] <= got[k]["hi"] + 1e-12, k
    assert sum(x == 0 for x in [value(r["exact_solve_rate"]) for r in st["per_step"]]) < len(rows)  # some solved
    s = st["summary"]
    assert s["mean_steps_to_first_correct"]["n"] == len(first)
    assert s["mean_steps_to_first_correct"]["value"] == pytest.approx(np.mean(first))
    assert st["first_correct_histogram"]["never"] == 20 - len(first)
    assert st["cell_changes"] == [None if v is None else pytest.approx(float(v), abs=1e-5) for v in cell_changes]
    assert sum(b["count"] for b in st["calibration"]["bins"]) == cf.size == st["calibration"]["cells"]
    top = [b for b in st["calibration"]["bins"] if b["lo"] == 0.9][0]
    m = cf >= 0.9
    assert top["count"] == int(m.sum()) and top["accuracy"]["value"] == pytest.approx(ok[m].mean())
    meta = json.loads((rep / "data/report.json").read_text())
    assert meta["metrics"]["z_H_matches_target"]["value"] == pytest.approx(zh / (81 * 20))
    assert meta["metrics"]["z_H_matches_target"]["n"] == 81 * 20
    assert meta["evaluation"] == {"puzzles": 20, "split_puzzles": 200, "requested": 20, "cap": meta["evaluation"]["cap"],
                                  "capped": False, "selection": "first"}
    # the full trace is kept for the 2 drawn puzzles only; the compact arrays cover the 20
    with np.load(rep / "data/trace.npz") as z, np.load(rep / "data/eval.npz") as e:
        assert z["preds"].shape[1] == 2 and e["solved"].shape == (tr.steps, 20)
        assert np.array_equal(e["correct_last"], tr.preds[-1] == tr.labels)
        assert np.array_equal(e["puzzle_index"], np.arange(20))


@needs_example
def test_batch_size_does_not_change_the_numbers():
    from reportgen.probes.trm import run_trm

    subject, split = example_subject()
    rows = np.arange(20)
    keep = np.isin(rows, [3, 17])
    out = {}
    for b in (3, 20):
        ev, tr = run_trm(subject, split.inputs[rows], split.labels[rows], split.puzzle_identifiers[rows], rows, keep,
                         "cpu", batch_size=b)
        tr.eval = ev
        out[b] = (ev, tr, solving_stats.compute(tr, solving_stats.Params()))
    (ev3, tr3, d3), (ev20, tr20, d20) = out[3], out[20]
    for k in ev3.arrays:
        a, b = ev3.arrays[k], ev20.arrays[k]
        assert a.shape == b.shape and (np.array_equal(a, b) if a.dtype.kind in "biu" else np.allclose(a, b, atol=1e-5)), k
    assert tr3.puzzle_index.tolist() == [3, 17] and np.array_equal(tr3.preds, tr20.preds)
    assert json.dumps(_rounded(d3)) == json.dumps(_rounded(d20))


def _rounded(x):
    if isinstance(x, float):
        return round(x, 4)
    if isinstance(x, dict):
        return {k: _rounded(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_rounded(v) for v in x]
    return x


@needs_example
def test_samples_no_longer_change_the_metrics_and_every_page_states_n(eval20):
    a, b = (json.loads((eval20 / n / "trm_sudoku_easy/step_1200/data/report.json").read_text()) for n in "ab")
    assert a["metrics"] == b["metrics"] and len(a["dataset"]["puzzle_indices"]) == 2
    assert len(b["dataset"]["puzzle_indices"]) == 5
    # manifest.json: every metric a dict with its n and interval
    man = json.loads((eval20 / "a/manifest.json").read_text())
    m = man["reports"][0]["metrics"]
    assert set(m) >= {"blank_accuracy", "exact_solve_rate", "mean_steps_to_first_correct", "halt_precision",
                      "halt_recall", "z_H_matches_target"}
    for k, v in m.items():
        assert set(v) == {"value", "n", "lo", "hi", "interval"}, k
    assert m["exact_solve_rate"]["n"] == 20 and m["exact_solve_rate"]["interval"] == "wilson"
    assert m["mean_steps_to_first_correct"]["interval"] == "bootstrap"
    # summary.md cells: value [interval] (n)
    row = next(ln for ln in (eval20 / "a/summary.md").read_text().splitlines() if ln.startswith("| [step_1200]"))
    acc = m["blank_accuracy"]
    assert (f"| {100 * acc['value']:.1f}% [{100 * acc['lo']:.1f}, {100 * acc['hi']:.1f}] (n={acc['n']}) |" in row)
    assert "(n=20)" in row
    # the site index, the run overview and the report say n
    for page in ("a/index.html", "a/trm_sudoku_easy/index.html", "a/trm_sudoku_easy/step_1200/index.html"):
        html = (eval20 / page).read_text()
        assert f"(n={acc['n']})" in html and "(n=20)" in html, page
    html = (eval20 / "a/trm_sudoku_easy/step_1200/index.html").read_text()
    assert "Statistics over the 20 evaluation puzzles" in html and "the first 20 of the 200 puzzles" in html
    assert "data/eval.npz" in html


@needs_example
def test_the_cap_of_eval_all_is_stated(tmp_path, monkeypatch):
    from reportgen.probes import trm as probes

    monkeypatch.setattr(probes, "EVAL_CPU_FLOP", 1.0)
    monkeypatch.setattr(probes, "EVAL_CAP_CPU_MIN", 30)
    r = build("--ckpt", CKPT, "--data", DATA, "--out", tmp_path, "--samples", 2, "--format", "html", "--device", "cpu",
              "--only", "solving_stats")
    assert r.exit_code == 0, r.output
    rep = tmp_path / "trm_sudoku_easy/step_1200"
    meta = json.loads((rep / "data/report.json").read_text())
    assert meta["evaluation"]["capped"] and meta["evaluation"]["puzzles"] == 30 and meta["evaluation"]["cap"] == 30
    assert meta["metrics"]["exact_solve_rate"]["n"] == 30
    html = (rep / "index.html").read_text()
    assert "the cap of <code>--eval all</code>" in html and "evaluates at most 30 puzzles" in html
    r = build("--ckpt", CKPT, "--data", DATA, "--out", tmp_path / "x", "--eval", 201)
    assert r.exit_code == 2 and "--eval 201 is larger than the split (200 puzzles)" in r.output
    assert not (tmp_path / "x" / "trm_sudoku_easy").exists()


@needs_example
def test_older_reports_with_bare_numbers_are_still_listed(eval20, tmp_path):
    import shutil

    from reportgen.site import write_site

    out = tmp_path / "site"
    shutil.copytree(eval20 / "a", out)
    meta_path = out / "trm_sudoku_easy/step_1200/data/report.json"
    meta = json.loads(meta_path.read_text())
    meta["metrics"] = {k: value(v) for k, v in meta["metrics"].items()}  # as an older reportgen wrote them
    meta_path.write_text(json.dumps(meta))
    write_site(out, "test")
    acc = meta["metrics"]["blank_accuracy"]
    assert f"{100 * acc:.1f}%" in (out / "index.html").read_text()
    assert f"| {100 * acc:.1f}% |" in (out / "summary.md").read_text()
    assert (out / "trm_sudoku_easy/figures/trend-metrics.svg").is_file()


def test_bootstrap_ratios_resample_units_like_bootstrap_mean():
    x = np.random.default_rng(3).random(300)
    assert bootstrap_ratios(x[None])[0] == pytest.approx(bootstrap_mean(x))
    # a ratio of sums: n counts the values in the denominator; its interval covers the value
    num, den = np.array([[3.0, 1.0, 0.0, 2.0]]), np.array([[4.0, 2.0, 1.0, 2.0]])
    (r,) = bootstrap_ratios(num, den)
    assert r["value"] == pytest.approx(6 / 9) and r["n"] == 9 and r["lo"] <= r["value"] <= r["hi"]
    (z,) = bootstrap_ratios(np.zeros((1, 3)), np.zeros((1, 3)))
    assert z["value"] is None and z["n"] == 0
    assert not math.isnan(bootstrap_ratios(np.ones((1, 2)))[0]["lo"])


def test_sudoku_latents_metric_is_over_the_evaluation_set():
    from test_probe_and_analyses import hand_trace

    d = sudoku_latents.compute(hand_trace(), sudoku_latents.Params())
    m = sudoku_latents.metrics(d)["z_H_matches_target"]
    assert m["n"] == 2 * 81 and m["value"] == 1.0 and m["interval"] == "wilson"
