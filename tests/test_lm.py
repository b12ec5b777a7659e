"""Language-model reports: seed-004 loading and TransformerLens parity, the probe's data on hand-checkable
cases, SAEs through SAELens (load, train offline, hand-set features), bad input, and a full build."""
from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import EVAL_TEXT, make_lm, save_restoration
from reportgen.checkpoints import discover
from reportgen.kinds import sniff_kind
from reportgen.errors import ReportgenError
from reportgen.data.tokens import load_tokens, load_vocab, mask_tokens
from reportgen.models.lm import read_checkpoint
from reportgen.text import show_token
from reportgen.models.restoration import to_hooked


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("interleaved", [False, True])
def test_hooked_transformer_matches_reference_forward(causal, interleaved):
    ref = make_lm(3, causal=causal, rotary_interleaved=interleaved)
    hooked = to_hooked(ref.state_dict(), ref.cfg)
    x = torch.randint(0, 258, (3, 40))
    with torch.no_grad():
        delta = (ref(x) - hooked(x)).abs().max().item()
    assert delta < 1e-4
    assert hooked.cfg.attention_dir == ("causal" if causal else "bidirectional")
    # the residual stream is the original one (no centring): block outputs match the reference's
    _, cache = hooked.run_with_cache(x)
    with torch.no_grad():
        from reportgen.models.restoration import rope_tables

        cos, sin = rope_tables(ref.cfg, 40)
        h = ref.layers[0](ref.embed(x), cos, sin)
    assert (cache["blocks.0.hook_resid_post"] - h).abs().max() < 1e-4


def test_causal_flag_changes_attention():
    a, b = make_lm(4), make_lm(4, causal=True)
    x = torch.randint(0, 258, (1, 16))
    with torch.no_grad():
        la, lb = a(x), b(x)
    assert not torch.allclose(la, lb)  # bidirectional sees the future
    with torch.no_grad():
        x2 = x.clone()
        x2[0, -1] = (x2[0, -1] + 1) % 258
        assert torch.allclose(b(x)[0, :-1], b(x2)[0, :-1], atol=1e-5)  # causal: changing the last token changes nothing before it


def test_seed_checkpoint_loads_as_saved(tmp_path):
    """A file written the way the seed's training code writes it (plain torch.save of the three keys)."""
    ref = make_lm(5)
    p = save_restoration(ref, tmp_path / "best_model.pt")
    assert sniff_kind(p) == "lm"
    obj = read_checkpoint(p)
    assert set(obj) == {"model_state_dict", "config", "vocab_size"}
    from reportgen.models.lm import load_model
    model, causal, rows, declared = load_model(p, obj, "restoration", "cpu")
    assert causal is False
    x = torch.randint(0, 258, (2, 20))
    with torch.no_grad():
        assert (model(x) - ref(x)).abs().max() < 1e-4
    (ref_path,) = discover([str(tmp_path)])
    assert ref_path.name == "best_model"


def test_transformer_lens_saved_dict_loads(tmp_path):
    ref = make_lm(6)
    hooked = to_hooked(ref.state_dict(), ref.cfg)
    p = tmp_path / "tl.pt"
    torch.save({"cfg": hooked.cfg.to_dict(), "state_dict": hooked.state_dict()}, p)  # numpy scalars inside cfg
    obj = read_checkpoint(p)
    from reportgen.models.lm import load_model, sniff
    assert sniff(obj) == "transformer_lens"
    model, causal, _, _ = load_model(p, obj, "transformer_lens", "cpu")
    x = torch.randint(0, 258, (2, 12))
    with torch.no_grad():
        assert (model(x) - ref(x)).abs().max() < 1e-4


def test_pickled_model_needs_trust(tmp_path):
    hooked = to_hooked(make_lm(7).state_dict(), make_lm(7).cfg)
    p = tmp_path / "tl_model.pt"
    torch.save({"model": hooked}, p)
    with pytest.raises(ReportgenError, match="--trust-checkpoint"):
        read_checkpoint(p)
    obj = read_checkpoint(p, trust=True)
    assert type(obj["model"]).__name__ == "HookedTransformer"


def test_vocab_and_token_sources(tmp_path):
    voc, src, byte_level = load_vocab("bytes", tmp_path / "x.pt", 258)
    assert byte_level and voc[65] == "A" and len(voc) == 258
    (tmp_path / "vocab.json").write_text(json.dumps({str(i): chr(i) for i in range(100)}))
    with pytest.raises(ReportgenError, match="100 entries but the model has 258"):
        load_vocab(None, tmp_path / "x.pt", 258)
    voc, src, _ = load_vocab(None, tmp_path / "none" / "x.pt", 10)
    assert voc[3] == "#3" and "none" in src
    text = tmp_path / "t.txt"
    text.write_text("héllo world " * 20)
    toks = load_tokens(text, [chr(i) for i in range(258)], True, 258, 16, 4)
    assert toks.shape == (4, 16) and bytes(toks[0].tolist()) == ("héllo world " * 2).encode()[:16]
    np.save(tmp_path / "t.npy", np.arange(64).reshape(2, 32))
    assert load_tokens(tmp_path / "t.npy", voc, False, 100, 16, 10).shape == (2, 16)
    torch.save(torch.full((3, 20), 300), tmp_path / "t.pt")
    with pytest.raises(ReportgenError, match="token id 300 is outside"):
        load_tokens(tmp_path / "t.pt", voc, False, 258, 16, 10)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ReportgenError, match="no evaluation sequence"):
        load_tokens(tmp_path / "empty.txt", [chr(i) for i in range(258)], True, 258, 16, 4)
    import datasets

    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"input_ids": [[1] * 20]}),
                               "validation": datasets.Dataset.from_dict({"input_ids": [[2] * 20, [3] * 20]})})
    dd.save_to_disk(str(tmp_path / "ds"))
    toks = load_tokens(tmp_path / "ds", voc, False, 258, 16, 10)
    assert toks.tolist() == [[2] * 16, [3] * 16]  # the validation split


def test_masking_is_seeded_and_spares_padding():
    t = np.full((4, 50), 7)
    t[:, -5:] = 256
    a, pa = mask_tokens(t, 0.3, 257, seed=1, protect=(256,))
    b, pb = mask_tokens(t, 0.3, 257, seed=1, protect=(256,))
    assert (a == b).all() and (pa == pb).all() and pa.any()
    assert not pa[:, -5:].any() and (a[pa] == 257).all() and (a[~pa] == t[~pa]).all()
    assert show_token(" \n\x01a\r\t") == "␠␊\\x01a␍␉"


def _trace_from_pattern(pattern, vocab=None):
    L, H, T, _ = pattern.shape
    e = -(pattern * np.log(np.clip(pattern, 1e-30, None))).sum(-1)
    return SimpleNamespace(
        activations={"attn.hook_pattern": {"sample": 0, "pattern": pattern, "mean": e.mean(-1), "std": e.std(-1),
                                           "min": e.min(-1), "max": e.max(-1), "rows": T,
                                           "per_sequence": e.mean(-1)[None], "seq_len": T}},
        inputs=np.zeros((1, T), dtype=np.int64), vocab=vocab or [chr(65 + i) for i in range(26)], n_layers=L,
        n_heads=H, causal=False)


def test_attention_entropy_of_uniform_and_one_hot_rows():
    import analyses.attention as A

    T = 8
    pat = np.zeros((1, 2, T, T), dtype=np.float32)
    pat[0, 0] = 1.0 / T  # uniform head
    pat[0, 1] = np.eye(T)  # each query looks at itself
    d = A.compute(_trace_from_pattern(pat), A.Params())
    h0, h1 = d["entropy"]["heads"]
    assert abs(h0["mean"] - np.log(T)) < 1e-5 and h0["reading"] == "diffuse"
    assert abs(h1["mean"]) < 1e-6 and h1["reading"] == "focused"
    assert abs(d["uniform_entropy"] - np.log(T)) < 1e-9


def test_probe_entropy_matches_pattern_and_loss_is_cross_entropy():
    """The probe's on-the-fly entropy equals the entropy of the cached pattern, and its loss is the mean CE."""
    from reportgen.models.lm import LMSubject
    from reportgen.probes.lm import probe_lm

    ref = make_lm(8)
    model = to_hooked(ref.state_dict(), ref.cfg)
    subject = LMSubject(ref=None, model=model, format="restoration", causal=False, config_rows=[], vocab=[chr(i) for i in range(258)],
                        vocab_source="", byte_level=True, mask_id=257, pad_id=256)
    tokens = np.random.default_rng(0).integers(0, 256, (5, 24))
    inputs, scored = mask_tokens(tokens, 0.2, 257, 0)
    tr = probe_lm(subject, tokens, inputs, scored, {"activations": {"attn.hook_pattern": {"sample": 2}}, "logits": {"top_k": 3}}, "cpu", max_batch=2)
    _, cache = model.run_with_cache(torch.as_tensor(inputs))
    p = cache["blocks.1.attn.hook_pattern"]
    e = -(p * p.clamp_min(1e-30).log()).sum(-1)  # [B,H,q]
    assert np.allclose(tr.activations["attn.hook_pattern"]["mean"][1], e.mean((0, 2)).numpy(), atol=1e-5)
    assert np.allclose(tr.activations["attn.hook_pattern"]["pattern"][1], p[2].numpy(), atol=1e-6)
    logits = model(torch.as_tensor(inputs))
    ce = torch.nn.functional.cross_entropy(logits[torch.as_tensor(scored)], torch.as_tensor(tokens)[torch.as_tensor(scored)])
    assert abs(tr.metrics["loss"] - ce.item()) < 1e-4
    assert tr.arrays["top_ids"].shape == (5, 24, 3)


def test_sae_features_on_a_hand_set_sae(tmp_path):
    """An SAE whose feature 0 reads the embedding direction of one token gives exactly its positions as top examples."""
    import analyses.sae_features as F
    from sae_lens import StandardSAE, StandardSAEConfig

    from reportgen.models.lm import LMSubject
    from reportgen.probes.lm import probe_lm

    ref = make_lm(9)
    with torch.no_grad():  # an embedding where token 120 ('x') alone has a large first coordinate
        ref.embed.weight[:, 0] = 0.0
        ref.embed.weight[120, 0] = 5.0
    model = to_hooked(ref.state_dict(), ref.cfg)
    sae = StandardSAE(StandardSAEConfig(d_in=32, d_sae=4, apply_b_dec_to_input=False))
    with torch.no_grad():
        for p in sae.parameters():
            p.zero_()
        sae.W_enc[0, 0] = 1.0
        sae.b_enc[0] = -1.0  # fires only where the first coordinate exceeds 1
        sae.W_dec[0, 0] = 1.0
    sae.cfg.metadata.hook_name = "hook_embed"
    tokens = np.full((3, 20), ord("a"))
    where = [(0, 3), (1, 10), (2, 0), (2, 19)]
    for s, t in where:
        tokens[s, t] = 120
    subject = LMSubject(ref=None, model=model, format="restoration", causal=False, config_rows=[], vocab=[chr(i) for i in range(258)],
                        vocab_source="", byte_level=True, mask_id=257, pad_id=256)
    scored = np.zeros_like(tokens, dtype=bool)
    scored[:, 5] = True
    params = F.Params(n_features=4, examples=10, context=2, loss_seqs=2, rank_by="mean")
    tr = probe_lm(subject, tokens, tokens, scored, F.needs(params), "cpu", sae=sae)
    d = F.compute(tr, params)
    (f0,) = [f for f in d["features"] if f["id"] == 0]
    assert len(d["features"]) == 1  # the other features never fire
    assert sorted((x["sequence"], x["position"]) for x in f0["examples"]) == where
    assert all(abs(x["activation"] - 4.0) < 1e-5 for x in f0["examples"])
    assert f0["density"] == pytest.approx(4 / 60) and d["dead"] == 3
    ex = next(x for x in f0["examples"] if (x["sequence"], x["position"]) == (1, 10))
    assert ex["t"] == ["a", "a", "x", "a", "a"] and ex["at"] == 2
    assert ex["a"] == [0, 0, 4.0, 0, 0]
    assert d["l0"] == pytest.approx(4 / 60)
    assert set(d["losses"]) == {"clean", "sae", "zero"}


def test_sae_training_through_saelens_offline(tmp_path):
    from reportgen.sae import load_sae, train_sae

    ref = make_lm(10)
    model = to_hooked(ref.state_dict(), ref.cfg)
    tokens = np.random.default_rng(0).integers(0, 256, (16, 32))
    sae, info = train_sae(model, tokens, 1, tmp_path / "sae", "cpu", training_tokens=4096, expansion=2, k=4)
    assert (tmp_path / "sae" / "cfg.json").is_file() and (tmp_path / "sae" / "sae_weights.safetensors").is_file()
    assert info["hook"] == "blocks.1.hook_resid_post" and info["d_sae"] == 64
    again, _ = load_sae(tmp_path / "sae", model, "cpu")
    x = torch.randn(5, 32)
    assert torch.allclose(sae.encode(x), again.encode(x))
    assert (again.encode(x) > 0).sum(-1).max() <= 4  # TopK k=4
    with pytest.raises(ReportgenError, match="layer out of range"):
        train_sae(model, tokens, 7, tmp_path / "bad", "cpu")
    # d_in mismatch: the same SAE against a wider model
    wide = to_hooked(make_lm(1, d_model=64, d_ff=128).state_dict(), make_lm(1, d_model=64, d_ff=128).cfg)
    with pytest.raises(ReportgenError, match="d_in 32 does not match blocks.1.hook_resid_post"):
        load_sae(tmp_path / "sae", wide, "cpu")


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "reportgen", "build", "-q", *args], capture_output=True, text=True,
                          cwd=cwd, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})


def test_lm_build_end_to_end(lm_run, tmp_path):
    run, text = lm_run
    out = tmp_path / "site"
    r = run_cli("--ckpt", str(run), "--data", str(text), "--out", str(out), "--seq-len", "32", "--train-sae", "1",
                "--sae-tokens", "4096", "--param", "token_map.grid_size=12", "--param", "sae_features.n_features=4")
    assert r.returncode == 0, r.stderr
    rep = out / "lm-run" / "step_20"
    html = (rep / "index.html").read_text()
    for sec in ("predictions", "attention", "gradient-flow", "token-map", "sae-features"):
        assert f'id="{sec}"' in html
    assert "blocks.1.hook_resid_post" in html and "<script src" not in html  # the page's script is inline
    assert "<script" not in html.split("</main>")[0].split('<script type="application/json"')[0]
    meta = json.loads((rep / "data" / "report.json").read_text())
    assert meta["kind"] == "lm" and meta["sae"]["hook"] == "blocks.1.hook_resid_post"
    assert {"loss", "masked_accuracy", "attention_entropy", "sae_l0", "sae_explained_variance"} <= set(meta["metrics"])
    sf = json.loads((rep / "data" / "sae_features.json").read_text())
    f = sf["features"][0]
    assert {"id", "density", "mean_activation", "max_activation", "examples", "logits_pos", "logits_neg"} <= set(f)
    assert {"sequence", "position", "activation"} <= set(f["examples"][0])
    tm = json.loads((rep / "data" / "token_map.json").read_text())
    assert np.asarray(tm["token_ids"]).shape == (12, 12) and len(tm["coordinates"]) == 144
    assert (rep / "sae" / "cfg.json").is_file() and (rep / "report.pdf").stat().st_size > 10_000
    pred = json.loads((rep / "data" / "predictions.json").read_text())
    assert pred["task"] == "masked" and all(row["masked"] == "[MASK]" for row in pred["rows"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["reports"]) == 2
    summary = (out / "summary.md").read_text()  # the run's own metrics only, none of a TRM's
    assert "### lm-run" in summary and "| checkpoint | loss (nats) | masked acc." in summary and "blank-cell" not in summary


@pytest.mark.parametrize("case,needle", [
    ("config", "config does not match the weights"),
    ("vocab", "vocabulary has 10 entries"),
    ("empty", "no evaluation sequence"),
    ("layer", "layer 9 is out of range"),
    ("grid", "at most grid_size"),
    ("sae_dim", "does not match"),
])
def test_lm_bad_input_is_one_line_exit_2(lm_run, tmp_path, case, needle):
    run, text = lm_run
    ckpt = run / "step_10.pt"
    args = ["--data", str(text), "--seq-len", "32", "--only", "predictions"]
    if case == "config":
        bad = tmp_path / "bad" / "m.pt"
        save_restoration(make_lm(0), bad, config={**make_lm(0).cfg.to_dict(), "d_ff": 128, "causal": False,
                                                   "rotary_interleaved": False, "layer_norm_eps": 1e-5, "mask_token_id": None,
                                                   "pad_token_id": None})
        ckpt = bad
    elif case == "vocab":
        v = tmp_path / "v.json"
        v.write_text(json.dumps([chr(i) for i in range(10)]))
        args += ["--vocab", str(v)]
    elif case == "empty":
        e = tmp_path / "e.txt"
        e.write_text("")
        args[1] = str(e)
    elif case == "layer":
        args = ["--data", str(text), "--seq-len", "32", "--only", "token_map", "--param", "token_map.layer=9"]
    elif case == "grid":
        args = ["--data", str(text), "--seq-len", "32", "--only", "token_map", "--param", "token_map.grid_size=200000"]
    elif case == "sae_dim":
        from reportgen.sae import train_sae

        wide = make_lm(2, d_model=64, d_ff=128)
        train_sae(to_hooked(wide.state_dict(), wide.cfg), np.random.default_rng(0).integers(0, 256, (8, 32)), 0,
                  tmp_path / "sae64", "cpu", training_tokens=2048, expansion=1, k=2)
        args = ["--data", str(text), "--seq-len", "32", "--only", "sae_features", "--sae", str(tmp_path / "sae64")]
    out = tmp_path / "site"
    r = run_cli("--ckpt", str(ckpt), "--out", str(out), *args)
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith("reportgen: error: ") and needle in lines[-1], r.stderr
    assert not list(out.glob("*/*/index.html"))


def test_sae_pass_that_stops_after_the_hook_layer_gives_the_same_features():
    """With no analysis reading logits, the pass stops after the SAE's layer; codes and losses do not change."""
    from sae_lens import TopKSAE, TopKSAEConfig

    from reportgen.models.lm import LMSubject
    from reportgen.probes.lm import probe_lm

    ref = make_lm(11)
    model = to_hooked(ref.state_dict(), ref.cfg)
    torch.manual_seed(0)
    sae = TopKSAE(TopKSAEConfig(d_in=32, d_sae=64, k=4))
    sae.cfg.metadata.hook_name = "blocks.0.hook_resid_post"
    subject = LMSubject(ref=None, model=model, format="restoration", causal=False, config_rows=[], vocab=[chr(i) for i in range(258)],
                        vocab_source="", byte_level=True, mask_id=257, pad_id=256)
    tokens = np.random.default_rng(1).integers(0, 256, (12, 16))
    inputs, scored = mask_tokens(tokens, 0.2, 257, 0)
    need = {"sae": {"loss_seqs": 3, "variance_seqs": 5, "choose": lambda s: [0, 1], "ablate": 1}}
    a = probe_with_sae = probe_lm(subject, tokens, inputs, scored, need, "cpu", max_batch=4, sae=sae)
    b = probe_lm(subject, tokens, inputs, scored, {**need, "logits": {"top_k": 2}}, "cpu", max_batch=4, sae=sae)
    assert "loss" not in a.metrics and "loss" in b.metrics
    a, b = a.sae[0], b.sae[0]
    for key in ("count", "top_tok", "sample_tok", "hist", "cooc"):
        assert (a[key] == b[key]).all()
    assert np.allclose(a["top_val"], b["top_val"], atol=1e-6)
    assert a["losses"] == pytest.approx(b["losses"], rel=1e-5)
    assert a["explained_variance"] == pytest.approx(b["explained_variance"], rel=1e-5)
    assert all(np.allclose(a["ablation"][j][t], b["ablation"][j][t], atol=1e-5, equal_nan=True) for j in a["ablation"] for t in a["ablation"][j])
    assert probe_with_sae.token_predictions is None
    assert a["variance_tokens"] == 5 * 16


def test_standard_l1_sae_trains_too(tmp_path):
    from reportgen.sae import train_sae

    ref = make_lm(12)
    model = to_hooked(ref.state_dict(), ref.cfg)
    tokens = np.random.default_rng(2).integers(0, 256, (8, 32))
    sae, info = train_sae(model, tokens, 0, tmp_path / "std", "cpu", arch="standard", training_tokens=2048, expansion=2)
    assert info["architecture"] == "standard" and info["d_sae"] == 64
    assert json.loads((tmp_path / "std" / "cfg.json").read_text())["architecture"] == "standard"


def test_causal_model_reports_next_token_predictions(tmp_path):
    ckpt = save_restoration(make_lm(13, causal=True), tmp_path / "causal" / "step_5.pt")
    text = tmp_path / "eval.txt"
    text.write_text(EVAL_TEXT)
    out = tmp_path / "site"
    r = run_cli("--ckpt", str(ckpt), "--data", str(text), "--out", str(out), "--seq-len", "24", "--format", "html",
                "--only", "predictions,attention")
    assert r.returncode == 0, r.stderr
    rep = out / "causal" / "step_5"
    pred = json.loads((rep / "data" / "predictions.json").read_text())
    assert pred["task"] == "next-token" and "[MASK]" not in json.dumps(pred["rows"])
    tr = np.load(rep / "data" / "trace.npz")
    assert (tr["targets"][:, :-1] == tr["tokens"][:, 1:]).all() and not tr["scored"][:, -1].any()
    att = json.loads((rep / "data" / "attention.json").read_text())
    pat = np.asarray(att["pattern_heads"])
    assert np.allclose(np.triu(pat, 1), 0)  # causal: no weight on later tokens
    meta = json.loads((rep / "data" / "report.json").read_text())
    assert "next_token_accuracy" in meta["metrics"] and meta["model"]["attention"] == "causal"
