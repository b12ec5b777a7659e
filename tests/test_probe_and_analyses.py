"""The probe follows upstream eval semantics; each analysis computes the right numbers on hand-made traces."""
from __future__ import annotations

import numpy as np
import pytest

import analyses
from analyses import solving_stats, step_evolution, sudoku_latents
from conftest import make_model, run_act
from reportgen.checkpoints import TRMSubject
from reportgen.probes.trm import TRMTrace, evalset_from_trace, probe_trm, reverse_embed
from reportgen.stats import value


def probe(model, n=4, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(2, 11, size=(n, 81))
    inputs = np.where(rng.random((n, 81)) < 0.5, 1, labels)
    subj = TRMSubject(ref=None, model=model, config=model.cfg, trained_dtype="float32", run_config={}, config_path=None)
    return probe_trm(subj, inputs, labels, np.zeros(n, np.int64), np.arange(n), "cpu", batch_size=3)


def test_trace_has_spec_shapes_and_eval_semantics():
    m = make_model(0)
    tr = probe(m, n=5)
    T, N, P, D, V = m.cfg.halt_max_steps, 5, m.cfg.prefix_len, m.cfg.hidden_size, m.cfg.vocab_size
    shapes = {"inputs": (N, 81), "labels": (N, 81), "puzzle_index": (N,), "preds": (T, N, 81), "confidence": (T, N, 81),
              "logits": (T, N, 81, V), "q_halt": (T, N), "q_continue": (T, N), "halted": (T, N),
              "z_H": (N, P + 81, D), "z_L": (N, P + 81, D), "z_H_tokens": (T, N, 81), "z_L_tokens": (T, N, 81),
              "z_L_lens_tokens": (T, N, 81), "embedding": (V, D)}
    assert {k: v.shape for k, v in tr.arrays.items()} == shapes
    # the logit lens on z_L after the last step is lm_head applied to the final z_L carry
    W = m.lm_head.weight.detach().float().numpy()
    assert np.array_equal(tr.z_L_lens_tokens[-1], (tr.z_L[:, P:] @ W.T).argmax(-1))
    # eval never halts on q_halt: halted only at the last step, for every row
    assert not tr.halted[:-1].any() and tr.halted[-1].all()
    # per-step outputs equal a plain eval loop over the whole batch (the probe ran in chunks of 3)
    steps, z_H, z_L = run_act(m, tr.inputs.astype(np.int64), np.zeros(N, np.int64))
    for t, (logits, qh, _) in enumerate(steps):
        assert np.allclose(tr.logits[t], logits.numpy(), atol=1e-5)
        assert np.array_equal(tr.preds[t], logits.argmax(-1).numpy())
        assert np.allclose(tr.q_halt[t], qh.numpy(), atol=1e-5)
        assert np.allclose(tr.confidence[t], logits.softmax(-1).amax(-1).numpy(), atol=1e-6)
    assert np.allclose(tr.z_H, z_H.numpy(), atol=1e-5)
    # reverse embedding of the final z_H cells is the last step's z_H_tokens
    assert np.array_equal(tr.z_H_tokens[-1], reverse_embed(tr.z_H[:, P:], tr.embedding))
    assert np.array_equal(tr.z_L_tokens[-1], reverse_embed(tr.z_L[:, P:], tr.embedding))


def test_trace_roundtrips_through_npz(tmp_path):
    tr = probe(make_model(1), n=2)
    tr.save(tmp_path / "trace.npz")
    back = TRMTrace.load(tmp_path / "trace.npz")
    assert back.prefix_len == tr.prefix_len
    assert all(np.array_equal(back.arrays[k], v) for k, v in tr.arrays.items())


def test_reverse_embedding_dot_versus_cosine():
    E = np.array([[10.0, 0.0], [0.0, 1.0]])
    z = np.array([[1.0, 2.0]])  # dot: [10, 2] -> token 0; cosine: [0.45, 0.89] -> token 1
    assert reverse_embed(z, E, "dot").tolist() == [0]
    assert reverse_embed(z, E, "cosine").tolist() == [1]
    with pytest.raises(ValueError):
        reverse_embed(z, E, "euclid")


# --- hand-made traces --------------------------------------------------------------------------------------

def hand_trace() -> TRMTrace:
    """2 puzzles, 3 steps. Puzzle 0: 2 blanks, wrong at step 1, solved from step 2, halts at step 3.
    Puzzle 1: 1 blank, never solved, halts (wrongly) at step 2."""
    label = np.tile(np.arange(2, 11), 9).reshape(81)
    inputs = np.stack([label, label]).copy()
    inputs[0, [0, 1]] = 1
    inputs[1, [5]] = 1
    labels = np.stack([label, label])
    preds = np.stack([labels] * 3).copy()  # [3, 2, 81]
    preds[0, 0, 0] = 5 if labels[0, 0] != 5 else 6  # puzzle 0, cell 0 wrong at step 1
    preds[:, 1, 5] = 2 if labels[1, 5] != 2 else 3  # puzzle 1, cell 5 always wrong
    conf = np.full((3, 2, 81), 0.95, np.float32)
    conf[0, 0, 0] = 0.55
    conf[:, 1, 5] = 0.35
    q_halt = np.array([[-3.0, -1.0], [-0.5, 2.0], [1.5, 2.5]], np.float32)
    T, N, V, D, P = 3, 2, 11, 4, 2
    E = np.eye(V, D, dtype=np.float32)
    arrays = dict(inputs=inputs.astype(np.int32), labels=labels.astype(np.int32), puzzle_index=np.array([7, 9]),
                  preds=preds.astype(np.int32), confidence=conf, logits=np.zeros((T, N, 81, V), np.float32),
                  q_halt=q_halt, q_continue=np.full((T, N), -5.0, np.float32), halted=np.eye(T, dtype=bool)[[-1]].T.repeat(N, 1),
                  z_H=np.zeros((N, P + 81, D), np.float32), z_L=np.zeros((N, P + 81, D), np.float32),
                  z_H_tokens=np.stack([labels] * 3).astype(np.int32), z_L_tokens=np.ones((T, N, 81), np.int32), embedding=E)
    tr = TRMTrace(arrays=arrays, prefix_len=P)
    tr.eval = evalset_from_trace(tr)  # the metrics' evaluation set: here the same two puzzles
    return tr


def test_solving_stats_on_hand_trace():
    d = solving_stats.compute(hand_trace(), solving_stats.Params(calibration_bins=10))
    s1, s2, s3 = ({k: value(v) for k, v in p.items()} for p in d["per_step"])
    assert s1["blank_accuracy"] == pytest.approx(1 / 3)  # 3 blanks, only puzzle 0 cell 1 right
    assert s2["blank_accuracy"] == pytest.approx(2 / 3)
    assert d["per_step"][0]["blank_accuracy"]["n"] == 3 and d["per_step"][0]["exact_solve_rate"]["n"] == 2
    assert [value(s["exact_solve_rate"]) for s in d["per_step"]] == [0.0, 0.5, 0.5]
    assert s1["cells_changed"] is None and s2["cells_changed"] == pytest.approx(0.5) and s3["cells_changed"] == 0.0
    # halting: step 2 -> only puzzle 1 halts and it is wrong; step 3 both halt, one solved
    assert s1["halt_precision"] is None and s1["halt_recall"] is None
    assert s2["halt_precision"] == 0.0 and s2["halt_recall"] == 0.0
    assert s3["halt_precision"] == 0.5 and s3["halt_recall"] == 1.0
    assert d["per_step"][2]["halt_precision"]["n"] == 2 and d["per_step"][2]["halt_recall"]["n"] == 1
    assert d["halting_last_step"] == {"true_positive": 1, "false_positive": 1, "false_negative": 0, "true_negative": 0}
    assert d["first_correct_histogram"] == {"1": 0, "2": 1, "3": 0, "never": 1}
    assert d["summary"]["mean_steps_to_first_correct"] == {"value": 2.0, "n": 1, "lo": None, "hi": None,
                                                          "interval": "bootstrap"}
    # calibration at the last step: blank cells have confidence .95 (2 right) and .35 (1 wrong)
    cal = {b["lo"]: b for b in d["calibration"]["bins"] if b["count"]}
    assert cal[0.3]["count"] == 1 and value(cal[0.3]["accuracy"]) == 0.0
    assert cal[0.9]["count"] == 2 and value(cal[0.9]["accuracy"]) == 1.0
    assert value(d["calibration"]["ece"]) == pytest.approx((1 * 0.35 + 2 * 0.05) / 3, abs=1e-6)
    assert s1["confidence_wrong"] == pytest.approx((0.55 + 0.35) / 2)
    # revisions: puzzle 0 cell 0 changed once (steps 1->2); cell 5 is blank only in puzzle 1, never changed
    assert d["cell_changes"][0] == 1.0 and d["cell_changes"][5] == 0.0 and d["cell_changes"][10] is None


def test_step_evolution_on_hand_trace():
    d = step_evolution.compute(hand_trace(), step_evolution.Params())
    p0, p1 = d["samples"]
    assert p0["first_correct_step"] == 2 and p0["first_halt_step"] == 3
    assert p1["first_correct_step"] is None and p1["first_halt_step"] == 2
    assert p0["steps"][0]["changed"] == [] and p0["steps"][1]["changed"] == [0] and p0["steps"][2]["changed"] == []
    assert p0["steps"][0]["wrong"] == [0] and p1["steps"][2]["wrong"] == [5]
    assert [s["solved"] for s in p0["steps"]] == [False, True, True]
    assert p0["puzzle_index"] == 7


def test_sudoku_latents_on_hand_trace():
    tr = hand_trace()
    d = sudoku_latents.compute(tr, sudoku_latents.Params())
    a, b = d["samples"]
    assert a["solved"] and not b["solved"] and a["blank_accuracy"] == 1.0 and b["blank_accuracy"] == 0.0
    assert a["z_H_matches_target"] == 1.0 and a["z_L_matches_target"] == 0.0
    # cosine reads z_H/z_L and the embedding from the trace: set z_H cells to embedding rows of token 4
    P = tr.prefix_len
    tr.arrays["z_H"][:, P:, :] = tr.embedding[3]
    d = sudoku_latents.compute(tr, sudoku_latents.Params(method="cosine"))
    assert d["method"] == "cosine" and set(d["samples"][0]["z_H_tokens"]) == {3}
    with pytest.raises(ValueError):
        sudoku_latents.Params(method="l2")


def test_figures_show_the_exported_data():
    tr = hand_trace()
    d = sudoku_latents.compute(tr, sudoku_latents.Params())
    fig = sudoku_latents.figures(d, sudoku_latents.Params())[0]
    texts = [it[3] for it in fig.drawing.items if it[0] == "text"]
    for name in sudoku_latents.PANELS:
        assert name in texts
    # the prediction panel (third board) shows the exported predictions as digits
    preds = [str(t - 1) for t in d["samples"][0]["preds"]]
    cells = [t for t in texts if t not in sudoku_latents.PANELS]
    board3 = cells[79 + 81: 79 + 81 + 81]  # boards are drawn in order; the input panel leaves its 2 blanks empty
    assert board3 == preds
    ev = step_evolution.compute(tr, step_evolution.Params())
    svg = step_evolution.figures(ev, step_evolution.Params())[0].drawing.svg()
    assert "step 2 · first solved" in svg and "step 3 · halts" in svg and "q_halt +1.50" in svg


def test_registry_lists_every_analysis_with_its_contract():
    assert [m.NAME for m in analyses.for_subject("trm")] == ["sudoku_latents", "step_evolution", "solving_stats",
                                                             "halting", "recursion"]
    assert [m.NAME for m in analyses.for_subject("lm")] == ["predictions", "attention", "gradient_flow", "token_map",
                                                            "sae_features"]
    for m in analyses.REGISTRY.values():
        assert callable(m.compute) and callable(m.figures) and m.Params()
    for m in analyses.for_subject("lm"):
        assert isinstance(m.needs(m.Params()), dict)  # what the one activation pass must compute
