"""Language-model probe within a memory budget: results do not depend on how the tokens are batched,
the batch the budget gives shrinks with what a sequence costs, --eval and --max-seqs bound what they
say, and --mask-id names the mask token of a model that names none."""
from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import EVAL_TEXT, make_lm, save_restoration
from reportgen.errors import ReportgenError
from reportgen.models.lm import LMSubject
from reportgen.data.tokens import mask_tokens
from analyses import token_map
from reportgen.probes.lm import backward_bytes, batch_size, forward_bytes, probe_lm
from reportgen.models.restoration import to_hooked

NEEDS = {"activations": {"attn.hook_pattern": {"sample": 3, "window": 6}}, "logits": {"top_k": 3}, "gradients": {"batch": 5},
         **{k: {**v, "layer": 1} for k, v in token_map.needs(token_map.Params(grid_size=5, spacing=1.0, method="direct",
                                                                              batch_size=25)).items()}}


def _subject(causal: bool = False):
    ref = make_lm(3, causal=causal)
    model = to_hooked(ref.state_dict(), ref.cfg)
    return LMSubject(ref=None, model=model, format="restoration", causal=causal, config_rows=[],
                     vocab=[chr(i) for i in range(258)], vocab_source="", byte_level=True, mask_id=257, pad_id=256)


@pytest.mark.parametrize("causal", [False, True])
def test_many_small_batches_give_the_results_of_one_big_batch(causal):
    subject = _subject(causal)
    tokens = np.random.default_rng(1).integers(0, 256, (9, 20))
    inputs, scored = (tokens, np.ones(tokens.shape, bool)) if causal else mask_tokens(tokens, 0.3, 257, 0)
    if causal:
        scored[:, -1] = False  # the last position has no next token
    big = probe_lm(subject, tokens, inputs, scored, NEEDS, "cpu", budget=2**34)
    small = probe_lm(subject, tokens, inputs, scored, NEEDS, "cpu", budget=1)  # below one sequence: batches of 1
    assert big.metrics["batch_size"] == 9 and small.metrics["batch_size"] == 1
    assert small.metrics["n_scored"] == big.metrics["n_scored"] == int(scored.sum())
    assert abs(small.metrics["loss"] - big.metrics["loss"]) < 1e-5
    assert small.metrics["hits"] == big.metrics["hits"]
    assert np.allclose(small.token_loss, big.token_loss, atol=1e-5)
    for key in ("mean", "std", "min", "max", "per_sequence", "pattern"):
        assert np.allclose(small.activations["attn.hook_pattern"][key], big.activations["attn.hook_pattern"][key], atol=1e-5), key
    assert small.activations["attn.hook_pattern"]["pattern"].shape == (2, 4, 6, 6)  # only the shown window is kept
    assert np.array_equal(small.arrays["top_ids"], big.arrays["top_ids"])
    assert np.allclose(small.arrays["top_probs"], big.arrays["top_probs"], atol=1e-6)
    g_small, g_big = dict(small.gradients), dict(big.gradients)  # micro-batches of 1 add up to the whole batch
    assert max(abs(g_small[k] - g_big[k]) / max(g_big[k], 1e-8) for k in g_big) < 1e-4
    assert np.array_equal(small.run_from["ids"], big.run_from["ids"])
    assert np.allclose(small.run_from["probs"], big.run_from["probs"], atol=1e-6)


def test_batch_size_shrinks_with_sequence_length_and_heads_under_a_fixed_budget():
    def cfg(heads=8, layers=16):
        return SimpleNamespace(d_model=384, d_mlp=1536, n_heads=heads, d_vocab=11812, n_layers=layers)

    budget = 2 * 2**30
    by_len = [batch_size(forward_bytes(cfg(), T), budget) for T in (64, 128, 256, 768, 2048)]
    assert by_len == sorted(by_len, reverse=True) and by_len[0] > by_len[-1] >= 1
    by_heads = [batch_size(forward_bytes(cfg(heads=h), 768), budget) for h in (1, 8, 32)]
    assert by_heads == sorted(by_heads, reverse=True) and by_heads[0] > by_heads[-1]
    # one layer's activations are in flight at a time: more layers do not shrink the forward batch,
    # but a backward pass keeps every layer's, so its micro-batch shrinks with them
    assert batch_size(forward_bytes(cfg(layers=4), 768), budget) == batch_size(forward_bytes(cfg(layers=64), 768), budget)
    assert batch_size(backward_bytes(cfg(layers=4), 768), budget) > batch_size(backward_bytes(cfg(layers=64), 768), budget)
    for T in (128, 768):  # what a batch holds stays within the budget
        b = batch_size(forward_bytes(cfg(), T), budget)
        assert b * forward_bytes(cfg(), T) <= budget < (b + 1) * forward_bytes(cfg(), T)
    # and the probe uses it: a budget the size of 3 sequences gives batches of 3
    subject = _subject()
    tokens = np.random.default_rng(0).integers(0, 256, (8, 16))
    inputs, scored = mask_tokens(tokens, 0.3, 257, 0)
    per_seq = forward_bytes(subject.model.cfg, 16)
    tr = probe_lm(subject, tokens, inputs, scored, {"logits": {"top_k": 2}}, "cpu", budget=3 * per_seq)
    assert tr.metrics["batch_size"] == 3


def test_loss_runs_over_eval_sequences_and_activations_over_the_first_max_seqs():
    subject = _subject()
    tokens = np.random.default_rng(2).integers(0, 256, (10, 12))
    inputs, scored = mask_tokens(tokens, 0.3, 257, 0)
    need = {"activations": {"attn.hook_pattern": {"sample": 0}}, "logits": {"top_k": 2}}
    tr = probe_lm(subject, tokens, inputs, scored, need, "cpu", budget=1, n_eval=10, n_act=4)
    assert tr.metrics["n_scored"] == int(scored.sum()) and tr.metrics["n_seqs"] == 10
    assert tr.activations["attn.hook_pattern"]["rows"] == 4 * 12 and tr.activations["attn.hook_pattern"]["per_sequence"].shape == (4, 2, 4)
    first4 = probe_lm(subject, tokens[:4], inputs[:4], scored[:4], need, "cpu", budget=1)
    assert np.allclose(tr.activations["attn.hook_pattern"]["mean"], first4.activations["attn.hook_pattern"]["mean"], atol=1e-6)
    tr = probe_lm(subject, tokens, inputs, scored, need, "cpu", budget=1, n_eval=3, n_act=10)
    assert tr.metrics["n_scored"] == int(scored[:3].sum()) and tr.activations["attn.hook_pattern"]["rows"] == 10 * 12


def test_lm_metrics_carry_n_and_interval():
    import analyses.attention as A
    import analyses.predictions as P

    subject = _subject()
    tokens = np.random.default_rng(4).integers(0, 256, (6, 16))
    inputs, scored = mask_tokens(tokens, 0.3, 257, 0)
    tr = probe_lm(subject, tokens, inputs, scored, {**A.needs(A.Params()), **P.needs(P.Params())}, "cpu")
    m = P.metrics(P.compute(tr, P.Params()))
    acc, loss = m["masked_accuracy"], m["loss"]
    assert acc["n"] == loss["n"] == int(scored.sum()) and acc["interval"] == "wilson" and loss["interval"] == "bootstrap"
    assert acc["lo"] <= acc["value"] <= acc["hi"] and loss["lo"] <= loss["value"] <= loss["hi"]
    assert abs(acc["value"] - tr.metrics["hits"] / tr.metrics["n_scored"]) < 1e-12
    ent = A.metrics(A.compute(tr, A.Params()))["attention_entropy"]
    assert ent["n"] == 6 and ent["lo"] <= ent["value"] <= ent["hi"]
    assert abs(ent["value"] - float(tr.activations["attn.hook_pattern"]["mean"].mean())) < 1e-5


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "reportgen", "build", "-q", "--format", "html", *args],
                          capture_output=True, text=True, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})


def test_mask_id_for_a_model_that_names_no_mask_token(tmp_path):
    ckpt = save_restoration(make_lm(0), tmp_path / "run" / "step_1.pt", vocab=False)  # config and vocab name none
    text = tmp_path / "eval.txt"
    text.write_text(EVAL_TEXT)
    base = ["--ckpt", str(ckpt), "--data", str(text), "--vocab", "bytes", "--seq-len", "32", "--only", "predictions"]
    r = _cli(*base, "--out", str(tmp_path / "a"))
    assert r.returncode == 2 and "needs a mask token" in r.stderr and "--mask-id" in r.stderr
    r = _cli(*base, "--mask-id", "258", "--out", str(tmp_path / "b"))
    assert r.returncode == 2 and "--mask-id 258: outside the model's vocabulary (ids 0..257)" in r.stderr
    assert not (tmp_path / "b" / "run").exists()
    r = _cli(*base, "--mask-id", "257", "--eval", "5", "--max-seqs", "3", "--out", str(tmp_path / "c"))
    assert r.returncode == 0, r.stderr
    rep = tmp_path / "c" / "run" / "step_1"
    meta = json.loads((rep / "data" / "report.json").read_text())
    assert meta["model"]["mask_id"] == 257
    assert meta["dataset"]["sequences"] == 5 and meta["dataset"]["activation_sequences"] == 3
    trace = np.load(rep / "data" / "trace.npz")
    assert (trace["inputs"][trace["scored"]] == 257).all() and trace["scored"].any()
    assert meta["metrics"]["masked_accuracy"]["n"] == int(trace["scored"][:5].sum())


def test_resolve_mask_id():
    from reportgen.kinds.lm import resolve_mask_id

    assert resolve_mask_id(None, 7, 10) == 7 and resolve_mask_id(3, 7, 10) == 3 and resolve_mask_id(None, None, 10) is None
    with pytest.raises(ReportgenError, match="--mask-id 10: outside"):
        resolve_mask_id(10, None, 10)
