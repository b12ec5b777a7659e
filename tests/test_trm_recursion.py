"""The recursion analysis: latents per cycle inside each ACT step, logit lens, dynamics, rule violations."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from conftest import make_model, needs_upstream, solved_grid  # noqa: E402
from reportgen.checkpoints import TRMSubject  # noqa: E402
from reportgen.probes.trm import reverse_embed, run_trm  # noqa: E402
from reportgen.probes.trm_cycles import sudoku_violations  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def subject(model):
    return TRMSubject(ref=None, model=model, config=model.cfg, trained_dtype="float32", run_config={}, config_path=None)


def puzzles(n, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.stack([solved_grid(rng).reshape(-1) + 1 for _ in range(n)])
    inputs = np.where(rng.random((n, 81)) < 0.5, 1, labels)
    return inputs, labels


def test_board_with_two_known_violations():
    board = np.ones(81, np.int64)  # all blank: no digit, no violation
    assert sudoku_violations(board) == 0
    board[0], board[4] = 6, 6  # digit 5 twice in row 0 (different columns and boxes)
    board[9 * 3 + 3], board[9 * 4 + 4] = 8, 8  # digit 7 twice in the centre box (different rows and columns)
    assert sudoku_violations(board) == 2
    # a solved grid has none; one cell changed to a digit of its row breaks its row, column and box
    grid = solved_grid(np.random.default_rng(1)).reshape(-1) + 1
    assert sudoku_violations(grid) == 0
    bad = grid.copy()
    bad[0] = grid[1]
    assert sudoku_violations(bad) == 3
    # batched, torch or numpy alike
    both = np.stack([board, grid])
    assert sudoku_violations(both).tolist() == [2, 0]
    assert sudoku_violations(torch.as_tensor(both)).tolist() == [2, 0]


def reference_cycles(model, inputs, mode):
    """A plain loop over the upstream recursion, recording z_H and z_L after every H cycle (or every update)."""
    cfg = model.cfg
    with torch.inference_mode():
        x = model.input_embeddings(torch.as_tensor(inputs), torch.zeros(len(inputs), dtype=torch.long))
        z_H, z_L = model.initial_carry(len(inputs), "cpu")
        rope = model.rope("cpu")
        steps = []
        for _ in range(cfg.halt_max_steps):
            rec = []
            for _h in range(cfg.H_cycles):
                for _l in range(cfg.L_cycles):
                    z_L = model.L_level(z_L, z_H + x, rope)
                    if mode == "L":
                        rec.append((z_H.clone(), z_L.clone()))
                z_H = model.L_level(z_H, z_L, rope)
                rec.append((z_H.clone(), z_L.clone()))
            steps.append(rec)
    return steps


@pytest.mark.parametrize("mode", ["H", "L"])
def test_per_cycle_latents_equal_a_reference_loop(mode):
    m = make_model(3, H_cycles=3, L_cycles=2)
    inputs, labels = puzzles(5)
    keep = np.array([1, 0, 1, 1, 0], bool)
    ev, tr = run_trm(subject(m), inputs, labels, np.zeros(5, np.int64), np.arange(5), keep, "cpu", 2, cycles=mode)
    ref = reference_cycles(m, inputs, mode)
    T, C = m.cfg.halt_max_steps, (m.cfg.L_cycles + 1) * m.cfg.H_cycles if mode == "L" else m.cfg.H_cycles
    P = m.cfg.prefix_len
    assert tr.z_H_cycles.shape == (T, C, 3, P + 81, m.cfg.hidden_size)
    expect_update = ([0, 0, 1] * 3) if mode == "L" else [1, 1, 1]
    assert tr.cycle_update.tolist() == ev.cycle_update.tolist() == expect_update
    W = m.lm_head.weight.detach().numpy()
    for t in range(T):
        for c in range(C):
            zh, zl = (z.numpy()[keep] for z in ref[t][c])
            assert np.allclose(tr.z_H_cycles[t, c], zh, atol=1e-5)
            assert np.allclose(tr.z_L_cycles[t, c], zl, atol=1e-5)
            assert np.array_equal(tr.z_L_lens[t, c], (zl[:, P:] @ W.T).argmax(-1))
            assert np.array_equal(tr.z_H_cycle_tokens[t, c], reverse_embed(zh[:, P:], tr.embedding))
        # the last cycle of a step is the step's carry: its lens is the step's prediction, its tokens the step's
        assert np.array_equal(tr.z_H_lens[t, -1], tr.preds[t])
        assert np.array_equal(tr.z_H_cycle_tokens[t, -1], tr.z_H_tokens[t])
        assert np.array_equal(tr.z_L_cycle_tokens[t, -1], tr.z_L_tokens[t])
    assert np.array_equal(tr.z_H_cycles[-1, -1], tr.z_H) and np.array_equal(tr.z_L_cycles[-1, -1], tr.z_L)
    # the evaluation reductions of every puzzle (kept or not) against the reference
    blank = inputs == 1
    z0 = [z.float().numpy() for z in m.initial_carry(5, "cpu")]
    prev = {"H": z0[0], "L": z0[1]}
    for t in range(T):
        for c in range(C):
            for k, name in enumerate(("H", "L")):
                z = ref[t][c][k].numpy()
                lens = (z[:, P:] @ W.T).argmax(-1)
                assert ev.arrays[f"lens_{name}_correct"][t, c].tolist() == ((lens == labels) & blank).sum(-1).tolist()
                rel = np.linalg.norm((z - prev[name]).reshape(5, -1), axis=1) / np.linalg.norm(z.reshape(5, -1), axis=1)
                assert np.allclose(ev.arrays[f"delta_{name}"][t, c], rel, rtol=1e-4)
                prev[name] = z
    assert np.array_equal(ev.violations, sudoku_violations(np.stack([tr_p for tr_p in _preds(m, inputs)])))
    # cutting the evaluation set keeps every axis straight
    h = ev.head(2)
    assert h.delta_H.shape == (T, C, 2) and h.violations.shape == (T, 2) and h.z_H_mean.shape[:2] == (T, 2)
    assert h.cycle_update.shape == (C,)


def _preds(model, inputs):
    from conftest import run_act

    steps, _, _ = run_act(model, inputs, np.zeros(len(inputs), np.int64))
    return [logits.argmax(-1).numpy() for logits, _, _ in steps]


def test_capture_changes_nothing_else():
    m = make_model(4)
    inputs, labels = puzzles(4, seed=2)
    args = (subject(m), inputs, labels, np.zeros(4, np.int64), np.arange(4), np.ones(4, bool), "cpu", 3)
    ev0, tr0 = run_trm(*args)
    ev1, tr1 = run_trm(*args, cycles="L")
    for k, v in tr0.arrays.items():
        assert np.array_equal(v, tr1.arrays[k]), k
    for k, v in ev0.arrays.items():
        assert np.array_equal(v, ev1.arrays[k]), k
    assert "z_H_cycles" not in tr0.arrays and "lens_H_correct" not in ev0.arrays


@needs_upstream
def test_last_cycle_is_the_carry_upstream_implies():
    """On upstream's own checkpoint and evaluation dump: the last cycle of the last step, read by lm_head and
    q_head, gives upstream's predictions and q logits."""
    from make_trm_upstream_bf16 import DATA, RUN
    from test_loading import load

    from reportgen.data.puzzles import read_split

    ds = read_split(DATA, "test")
    dump = torch.load(RUN / "step_400_all_preds.0", map_location="cpu", weights_only=True)
    subj = load(RUN / "step_400", DATA)
    n = len(ds.inputs)
    _, tr = run_trm(subj, ds.inputs, ds.labels, ds.puzzle_identifiers, np.arange(n), np.ones(n, bool), "cpu", 32,
                    cycles="H")
    m, P = subj.model, subj.config.prefix_len
    assert tr.z_H_cycles.shape[:3] == (subj.config.halt_max_steps, subj.config.H_cycles, n)
    with torch.inference_mode():
        zH = torch.from_numpy(tr.z_H_cycles[-1, -1])
        preds = m.lm_head(zH)[:, P:].argmax(-1).numpy()
        q = m.q_head(zH[:, 0]).numpy()
    up = dump["preds"].numpy()
    assert np.array_equal(dump["inputs"].numpy(), ds.inputs.astype(np.int32))
    assert (preds == up).mean() > 0.999
    assert np.allclose(q[:, 0], dump["q_halt_logits"].numpy(), atol=1e-4)
    assert np.allclose(q[:, 1], dump["q_continue_logits"].numpy(), atol=1e-4)
    for t in range(tr.steps):  # and at every step, the last cycle is the carry the step's outputs come from
        assert np.array_equal(tr.z_H_lens[t, -1], tr.preds[t])


def test_report_on_the_example_shows_the_recursion(tmp_path):
    from test_build import build

    out = tmp_path / "site"
    r = build("--ckpt", ROOT / "examples/sudoku/checkpoints/trm_sudoku_easy/step_1200", "--out", out, "--eval", 20,
              "--samples", 2, "--format", "html")
    assert r.exit_code == 0, r.output
    rep = out / "trm_sudoku_easy" / "step_1200"
    html = (rep / "index.html").read_text()
    assert 'id="recursion"' in html and "Recursion, cycle by cycle" in html
    assert "logit lens" in html.lower() and "rule violations" in html
    data = json.loads((rep / "data" / "recursion.json").read_text())
    assert data["puzzles"] == 20 and data["cycles"] == ["H1", "H2"]
    lens_L = data["summary"]["z_L_lens_accuracy"]
    assert lens_L["n"] == data["cells"] and lens_L["lo"] <= lens_L["value"] <= lens_L["hi"]
    # the lens on z_H at the carry is the model's own answer: the solving statistics' blank accuracy
    stats = json.loads((rep / "data" / "solving_stats.json").read_text())
    assert data["summary"]["z_H_lens_accuracy"]["value"] == pytest.approx(stats["summary"]["blank_accuracy"]["value"])
    with np.load(rep / "data" / "trace.npz") as z:
        assert z["z_H_cycles"].shape[:3] == (4, 2, 2) and z["cycle_update"].tolist() == [1, 1]
    with np.load(rep / "data" / "eval.npz") as z:
        assert z["lens_L_correct"].shape == (4, 2, 20) and z["violations"].shape == (4, 20)
    for k in (1, 2, 3):
        assert len(list((rep / "figures").glob(f"*-recursion-{k}.svg"))) == 1
    # the parameter reaches the probe: every update is kept with cycles=L
    out2 = tmp_path / "site2"
    r = build("--ckpt", ROOT / "examples/sudoku/checkpoints/trm_sudoku_easy/step_1200", "--out", out2, "--eval", 5,
              "--samples", 1, "--format", "html", "--only", "recursion", "--param", "recursion.cycles=L")
    assert r.exit_code == 0, r.output
    with np.load(out2 / "trm_sudoku_easy" / "step_1200" / "data" / "trace.npz") as z:
        assert z["cycle_update"].tolist() == [0, 0, 1, 0, 0, 1]
