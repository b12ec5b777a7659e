"""SAE feature pages: every SAELens architecture and hook point, checked against SAELens's own encode / decode;
the streamed statistics against brute force over the dense codes; ranking, ids, prompts and bad input."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import EVAL_TEXT, make_lm, save_restoration
from reportgen.data.tokens import mask_tokens
from reportgen.models.lm import LMSubject
from reportgen.models.restoration import to_hooked

VOCAB = [chr(i) for i in range(256)] + ["[PAD]", "[MASK]"]


def saelens_saes(folder):
    """Tiny SAEs of each SAELens architecture on the tiny LM's hook points (d_model 32, 4 heads of 8), made by
    SAELens's classes and saved with save_model / save_inference_model: {name: folder}."""
    from sae_lens import (BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig, GatedSAE, GatedSAEConfig, JumpReLUSAE,
                          JumpReLUSAEConfig, MatryoshkaBatchTopKTrainingSAE, MatryoshkaBatchTopKTrainingSAEConfig,
                          StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig, Transcoder, TranscoderConfig)
    from sae_lens.saes.sae import SAEMetadata

    torch.manual_seed(0)
    m = lambda h, **kw: SAEMetadata(hook_name=h, model_name="tiny", **kw)  # noqa: E731
    made = {
        "standard-resid_pre": StandardSAE(StandardSAEConfig(d_in=32, d_sae=48, metadata=m("blocks.1.hook_resid_pre"))),
        "topk-resid_post": TopKSAE(TopKSAEConfig(d_in=32, d_sae=64, k=4, metadata=m("blocks.0.hook_resid_post"))),
        "jumprelu-mlp_out": JumpReLUSAE(JumpReLUSAEConfig(d_in=32, d_sae=40, metadata=m("blocks.0.hook_mlp_out"))),
        "gated-hook_z": GatedSAE(GatedSAEConfig(d_in=32, d_sae=40, reshape_activations="hook_z",
                                                metadata=m("blocks.1.attn.hook_z"))),
        "transcoder-mlp": Transcoder(TranscoderConfig(d_in=32, d_sae=56, d_out=32, apply_b_dec_to_input=False,
                                                      metadata=m("blocks.0.ln2.hook_normalized",
                                                                 hook_name_out="blocks.0.hook_mlp_out"))),
    }
    with torch.no_grad():  # SAELens inits JumpReLU thresholds at 0 and decoders small: spread them so features differ
        made["jumprelu-mlp_out"].threshold.add_(torch.rand(40) * 0.3)
        for sae in made.values():
            sae.W_dec.mul_(5.0)
    out = {}
    for name, sae in made.items():
        sae.save_model(folder / name)
        out[name] = folder / name
    b = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=32, d_sae=48, k=3, metadata=m("blocks.1.hook_resid_post")))
    with torch.no_grad():
        b.topk_threshold.fill_(0.03)  # saving folds the decoder norms (0.1) into W_enc
    b.save_inference_model(folder / "batchtopk-resid_post")  # saved as a JumpReLU SAE
    mat = MatryoshkaBatchTopKTrainingSAE(MatryoshkaBatchTopKTrainingSAEConfig(
        d_in=32, d_sae=48, k=3, matryoshka_widths=[16, 48], metadata=m("blocks.0.hook_resid_pre")))
    with torch.no_grad():
        mat.topk_threshold.fill_(0.03)  # saving folds the decoder norms (0.1) into W_enc
    mat.save_inference_model(folder / "matryoshka-resid_pre")
    out["batchtopk-resid_post"] = folder / "batchtopk-resid_post"
    out["matryoshka-resid_pre"] = folder / "matryoshka-resid_pre"
    return out


def reference(model, folder, inputs, targets, scored, var_seqs: int, loss_seqs: int) -> dict:
    """L0, explained variance and spliced loss straight from SAELens (a fresh load, its own hook_z reshaping)."""
    from sae_lens import SAE

    sae = SAE.load_from_disk(str(folder))
    meta = sae.cfg.metadata
    hin, hout = meta.hook_name, meta.hook_name_out or meta.hook_name
    x = torch.as_tensor(inputs).long()
    with torch.no_grad():
        _, cache = model.run_with_cache(x, names_filter=[hin, hout])
        a = cache[hin]
        z = getattr(sae, "hook_z_reshaping_mode", False)
        f = sae.encode(a if z else a.reshape(*a.shape[:2], -1))
        l0 = float((f != 0).sum(-1).float().mean())
        y = cache[hout][:var_seqs].reshape(var_seqs * x.shape[1], -1)
        r = sae.decode(f[:var_seqs]).reshape(y.shape)
        ev = 1 - float(((r - y) ** 2).sum() / ((y - y.mean(0)) ** 2).sum())
        recon = sae.decode(f[:loss_seqs])
        logits = model.run_with_hooks(x[:loss_seqs], fwd_hooks=[(hout, lambda act, hook: recon.reshape(act.shape))])
        sc = torch.as_tensor(scored[:loss_seqs])
        loss = torch.nn.functional.cross_entropy(logits[sc], torch.as_tensor(targets[:loss_seqs]).long()[sc]).item()
    return {"l0": l0, "ev": ev, "loss": loss, "arch": sae.cfg.architecture()}


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "reportgen", "build", "-q", *map(str, args)], capture_output=True,
                          text=True, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def sae_case(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("saes")
    ckpt = save_restoration(make_lm(3), tmp / "run" / "step_5.pt")
    text = tmp / "eval.txt"
    text.write_text(EVAL_TEXT)
    return ckpt, text, saelens_saes(tmp / "saes"), tmp


def test_every_architecture_and_hook_equals_saelens(sae_case, tmp_path):
    """One report with seven SAEs (standard, TopK, JumpReLU, Gated on hook_z, a transcoder, BatchTopK and
    Matryoshka as SAELens saves them): each one's L0, explained variance and spliced loss equal SAELens's."""
    ckpt, text, saes, _ = sae_case
    out = tmp_path / "site"
    args = ["--ckpt", ckpt, "--data", text, "--seq-len", "32", "--only", "sae_features", "--out", out, "--format", "html",
            "--param", "sae_features.n_features=3", "--param", "sae_features.loss_seqs=4",
            "--param", "sae_features.variance_seqs=5"]
    for folder in saes.values():
        args += ["--sae", folder]
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    rep = out / "run" / "step_5"
    data = json.loads((rep / "data" / "sae_features.json").read_text())
    tr = np.load(rep / "data" / "trace.npz")
    model = to_hooked(make_lm(3).state_dict(), make_lm(3).cfg)
    assert [b["label"] for b in data["saes"]] == list(saes)
    for block, folder in zip(data["saes"], saes.values()):
        ref = reference(model, folder, tr["inputs"], tr["targets"], tr["scored"], 5, 4)
        assert block["architecture"] == ref["arch"]
        assert block["l0"] == pytest.approx(ref["l0"], rel=1e-5), folder.name
        assert block["explained_variance"] == pytest.approx(ref["ev"], rel=1e-4, abs=1e-5), folder.name
        assert block["losses"]["sae"] == pytest.approx(ref["loss"], rel=1e-4), folder.name
        assert block["features"], folder.name
    tc = data["saes"][list(saes).index("transcoder-mlp")]
    assert tc["transcoder"] and tc["hook"] == "blocks.0.ln2.hook_normalized" and tc["out_hook"] == "blocks.0.hook_mlp_out"
    z = data["saes"][list(saes).index("gated-hook_z")]
    assert "through blocks.1.attn.W_O" in z["logit_how"]
    assert len(z["features"][0]["heads"]) == 4 and sum(z["features"][0]["heads"]) == pytest.approx(1, abs=0.01)
    html = (rep / "index.html").read_text()
    assert 'class="num saecmp"' in html and html.count("<h3 id=\"s") == 7
    assert 'id="s4-feature-' in html  # cards of the fifth SAE, anchored apart from the others'


def probe_with(sae, tokens, max_batch=None, **params):
    import analyses.sae_features as F
    from reportgen.probes.lm import probe_lm

    model = to_hooked(make_lm(4).state_dict(), make_lm(4).cfg)
    subject = LMSubject(ref=None, model=model, format="restoration", causal=False, config_rows=[], vocab=VOCAB,
                        vocab_source="", byte_level=True, mask_id=257, pad_id=256)
    inputs, scored = mask_tokens(tokens, 0.2, 257, 0)
    p = F.Params(**params)
    need = F.needs(p)
    need["sae"]["prompts"] = [np.frombuffer(t.encode(), np.uint8).astype(np.int64) for t in p.prompts]  # as the kind does
    tr = probe_lm(subject, tokens, inputs, scored, need, "cpu", sae=sae, max_batch=max_batch)
    return model, inputs, tr, F.compute(tr, p)


def topk_sae(hook="blocks.0.hook_resid_post", d_sae=64, k=4):
    from sae_lens import TopKSAE, TopKSAEConfig

    torch.manual_seed(1)
    sae = TopKSAE(TopKSAEConfig(d_in=32, d_sae=d_sae, k=k))
    sae.cfg.metadata.hook_name = hook
    return sae


def test_streamed_statistics_equal_brute_force_and_do_not_depend_on_batches(monkeypatch):
    import analyses.sae_features as F

    tokens = np.random.default_rng(5).integers(0, 256, (12, 24))
    sae = topk_sae()
    model, inputs, tr, d = probe_with(sae, tokens, max_batch=5, n_features=6, examples=5, context=3, rank_by="max")
    monkeypatch.setattr(F._Cooc, "CHUNK", 1)  # co-occurrence one feature at a time: the same counts
    _, _, tr1, d1 = probe_with(sae, tokens, max_batch=1, n_features=6, examples=5, context=3, rank_by="max")
    with torch.no_grad():
        _, cache = model.run_with_cache(torch.as_tensor(inputs), names_filter=[sae.cfg.metadata.hook_name])
        f = sae.encode(cache[sae.cfg.metadata.hook_name].reshape(-1, 32)).numpy()  # [N*T, d_sae]
    s = tr.sae[0]
    assert (s["count"] == (f != 0).sum(0)).all()
    assert np.allclose(s["max"], f.max(0), atol=1e-6)
    order = np.lexsort((np.arange(64), -f.max(0)))
    assert [c["id"] for c in d["features"]] == [int(j) for j in order[:6]]
    T = tokens.shape[1]
    for card in d["features"]:
        j = card["id"]
        col = f[:, j]
        best = np.lexsort((np.arange(len(col)), -col))[:5]
        assert [x["sequence"] * T + x["position"] for x in card["examples"]] == [int(t) for t in best if col[t] > 0]
        x = card["examples"][0]  # the shading around the top token is the feature's activation there
        start = x["sequence"] * T + x["start"]
        assert np.allclose(x["a"], col[start:start + len(x["t"])], rtol=1e-3, atol=1e-3)  # kept as float16
        for iv in card["intervals"]:
            for e in iv["examples"]:
                assert iv["lo"] - 5e-5 <= e["activation"] <= iv["hi"] + 5e-5  # activations rounded to 4 decimals
        # co-occurrence: the features firing with j on j's tokens (all tokens are kept here)
        on = f[col != 0] != 0
        n = on.sum(0)
        n[j] = 0
        assert [(c["id"], c["n"]) for c in card["cooccurring"]] == [(int(k), int(n[k])) for k in
                                                                     np.lexsort((np.arange(64), -n))[:5] if n[k]]
        W = sae.W_dec.detach().numpy()
        W = W / np.linalg.norm(W, axis=1, keepdims=True)
        cos = W @ W[j]
        cos[j] = -np.inf
        assert [c["id"] for c in card["neighbours"]] == [int(k) for k in np.argsort(-cos)[:5]]
    # the same numbers whatever the batch size (and co-occurrence chunking)
    assert json.dumps(d["features"]) == json.dumps(d1["features"])
    assert d["l0"] == pytest.approx(4.0)


@pytest.mark.parametrize("search_cost", [0, 10**9], ids=["searched", "dense"])
def test_topk_codes_taken_sparse_give_what_the_dense_codes_give(monkeypatch, search_cost):
    """A TopK SAE's codes come as its TopK's sparse (token, feature) pairs, the window activations found among them
    or read from dense codes made where that is cheaper: every statistic equals the one from SAELens's dense codes."""
    import json

    import reportgen.probes.sae as P

    tokens = np.random.default_rng(9).integers(0, 256, (10, 24))
    sae = topk_sae(k=6)
    assert P.Spliced(sae)._topk is not None
    monkeypatch.setattr(P.Codes, "SEARCH_COST", search_cost)
    *_, tr, d = probe_with(sae, tokens, max_batch=3, n_features=8, examples=4, context=3, ablate=1, rank_by="max")
    monkeypatch.setattr(P.Spliced, "codes", lambda self, flat: P.Codes.of(self.encode(flat)))  # dense, as before
    *_, tr1, d1 = probe_with(sae, tokens, max_batch=3, n_features=8, examples=4, context=3, ablate=1, rank_by="max")
    a, b = tr.sae[0], tr1.sae[0]
    for key in ("count", "sum", "max", "hist", "cooc", "top_tok", "top_val", "top_win", "sample_tok", "sample_val", "sample_win"):
        assert np.array_equal(a[key], b[key], equal_nan=True), key
    assert a["explained_variance"] == b["explained_variance"] and a["l0"] == b["l0"]
    assert json.dumps(d["features"]) == json.dumps(d1["features"])


def test_quantile_intervals_hold_equal_shares():
    tokens = np.random.default_rng(6).integers(0, 256, (40, 32))
    sae = topk_sae(d_sae=16, k=6)  # dense features: many firings each
    model, inputs, tr, d = probe_with(sae, tokens, n_features=2, intervals=5, interval_examples=3, rank_by="density")
    with torch.no_grad():
        _, cache = model.run_with_cache(torch.as_tensor(inputs), names_filter=["blocks.0.hook_resid_post"])
        f = sae.encode(cache["blocks.0.hook_resid_post"].reshape(-1, 32)).numpy()
    for card in d["features"]:
        v = f[:, card["id"]]
        v = v[v > 0]
        assert len(card["intervals"]) == 5 and card["intervals"][-1]["hi"] == pytest.approx(v.max(), rel=1e-5)
        for iv in card["intervals"]:
            share = ((v >= iv["lo"]) & (v <= iv["hi"])).mean()
            assert share == pytest.approx(0.2, abs=0.05)  # log bins 48 a decade: within a bin's width
            assert len(iv["examples"]) == 3
        assert len(card["histogram"]["marks"]) == 4 and sum(card["histogram"]["counts"]) == len(v)


def test_default_ranking_leaves_out_dense_and_dead_features_and_ids_pick_features():
    import analyses.sae_features as F

    count = np.array([0, 900, 50, 10, 5, 0])
    s = {"count": count, "n_tokens": 1000, "sum": count * np.array([0, 9, 2, 3, 1, 0.0]), "max": np.array([0, 9, 4, 5, 9, 0.0]),
         "hook": "h"}
    assert F.choose(F.Params(n_features=10), s) == [2, 3, 4]  # 1 fires on 90% of tokens: dense
    assert F.choose(F.Params(n_features=10, dense=0.95), s) == [1, 2, 3, 4]
    assert F.choose(F.Params(n_features=2, rank_by="max"), s) == [1, 4]
    assert F.choose(F.Params(n_features=2, rank_by="density"), s) == [1, 2]
    assert F.choose(F.Params(ids="5,3"), s) == [5, 3]  # a given dead feature still gets its card
    with pytest.raises(ValueError, match="feature id 6 is out of range"):
        F.choose(F.Params(ids=[6]), s)
    with pytest.raises(ValueError, match="ids must be feature numbers"):
        F.Params(ids="3,x")


def test_ablation_effect_and_prompt_view_equal_a_hand_computation():
    tokens = np.random.default_rng(7).integers(0, 256, (6, 16))
    sae = topk_sae()
    model, inputs, tr, d = probe_with(sae, tokens, n_features=2, ablate=1, context=3, prompts=["abc de"],
                                      rank_by="max")
    card = d["features"][0]
    x = card["examples"][0]
    j, seq = card["id"], x["sequence"]
    hook = "blocks.0.hook_resid_post"
    xin = torch.as_tensor(inputs[seq:seq + 1])
    tg = torch.as_tensor(tokens[seq:seq + 1])

    def nll(logits):
        return -logits.log_softmax(-1).gather(-1, tg[..., None])[0, :, 0]

    lo, hi = x["start"], x["start"] + len(x["t"])

    def ablate(act, hook):  # the feature taken out of the context's tokens
        f = sae.encode(act.reshape(-1, 32))
        a = torch.zeros_like(f[:, j:j + 1])
        a[lo:hi] = f[lo:hi, j:j + 1]
        return act - (a * sae.W_dec[j]).reshape(act.shape)

    with torch.no_grad():
        delta = (nll(model.run_with_hooks(xin, fwd_hooks=[(hook, ablate)])) - nll(model(xin))).numpy()
    assert np.allclose(x["ablation"], delta[lo:hi], atol=2e-3)  # the window's activations are kept as float16
    assert "ablation" not in card["examples"][1]
    (p,) = d["saes"][0]["prompts"]
    ids = torch.as_tensor([list(b"abc de")])
    with torch.no_grad():
        _, cache = model.run_with_cache(ids, names_filter=[hook])
        f = sae.encode(cache[hook][0])
        probs = model(ids)[0].softmax(-1)
    assert [t["t"] for t in p["tokens"]] == list("abc de")
    for i, t in enumerate(p["tokens"]):
        top = f[i].topk(4)
        assert [g["id"] for g in t["features"]] == top.indices.tolist()
        assert t["predictions"][0]["t"] == VOCAB[int(probs[i].argmax())]


WINDOW_BLOCKS = [  # last blocks the ablation runs for a window's queries alone
    dict(positional_embedding_type="rotary", attention_dir="bidirectional"),
    dict(positional_embedding_type="rotary", n_key_value_heads=2, normalization_type="RMS"),
    dict(positional_embedding_type="standard"),
    dict(positional_embedding_type="rotary", rotary_dim=4, rotary_adjacent_pairs=True),
    dict(positional_embedding_type="rotary", use_local_attn=True, attn_types=["global", "local"], window_size=5,
         normalization_type="RMS", use_normalization_before_and_after=True),
    dict(positional_embedding_type="standard", normalization_type=None, attn_scores_soft_cap=5.0, use_attn_scale=False),
]


@pytest.mark.parametrize("extra", WINDOW_BLOCKS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_last_block_at_window_positions_equals_the_full_block(extra):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from reportgen.probes.sae import _gather, _last_block_at, _window_block_ok

    torch.manual_seed(0)
    model = HookedTransformer(HookedTransformerConfig(n_layers=2, d_model=32, d_head=8, n_heads=4, d_mlp=64, n_ctx=24,
                                                      d_vocab=50, act_fn="gelu", **extra)).eval()
    for w in model.parameters():
        torch.nn.init.normal_(w, std=0.3)
    assert _window_block_ok(model, 24)
    q = torch.as_tensor(np.clip(np.array([3, 0, 20, 10, 17])[:, None] + np.arange(-3, 4), 0, 23))
    with torch.inference_mode():
        resid = model(torch.randint(0, 50, (5, 24)), stop_at_layer=1)
        full = _gather(model(resid, start_at_layer=1, stop_at_layer=2), q)
        assert torch.allclose(_last_block_at(model.blocks[1], resid, q), full, atol=1e-5)
        assert not torch.allclose(_last_block_at(model.blocks[1], resid, (q + 1).clamp(max=23)), full, atol=1e-2)
        # the clean keys and values kept, the stream changed at the window's positions inside the sequence only
        k_hook, v_hook = last_block_kv_hooks(model)
        _, cache = model.run_with_cache(resid, start_at_layer=1, stop_at_layer=2, names_filter=[k_hook, v_hook])
        ok = torch.as_tensor((np.array([3, 0, 20, 10, 17])[:, None] + np.arange(-3, 4) >= 0)
                             & (np.array([3, 0, 20, 10, 17])[:, None] + np.arange(-3, 4) < 24))
        rows = torch.arange(5)[:, None].expand_as(q)
        changed = resid.clone()
        changed[rows[ok], q[ok]] += torch.randn(int(ok.sum()), 32)
        full = _gather(model(changed, start_at_layer=1, stop_at_layer=2), q)
        kv = lambda ok: (cache[k_hook].clone(), cache[v_hook].clone(), ok)  # noqa: E731
        assert torch.allclose(_last_block_at(model.blocks[1], _gather(changed, q), q, kv(ok)), full, atol=1e-5)
        assert not torch.allclose(_last_block_at(model.blocks[1], _gather(changed, q), q, kv(ok & False)), full,
                                  atol=1e-2)  # keys and values not recomputed at the window: wrong


def last_block_kv_hooks(model):
    """The last block's key and value hooks that the probe keeps for an SAE writing to that block's input."""
    from sae_lens import StandardSAE, StandardSAEConfig

    from reportgen.probes.sae import Spliced, last_block_kv

    sae = StandardSAE(StandardSAEConfig(d_in=model.cfg.d_model, d_sae=4))
    sae.cfg.metadata.hook_name = f"blocks.{model.cfg.n_layers - 2}.hook_resid_post"
    hooks = last_block_kv(model, Spliced(sae), model.cfg.n_ctx)
    assert hooks is not None
    return hooks


def test_spliced_losses_from_the_kept_stream_equal_the_run_from_tokens():
    from sae_lens import Transcoder, TranscoderConfig
    from sae_lens.saes.sae import SAEMetadata

    from reportgen.probes.sae import Spliced, entry_hook, spliced_losses

    model = to_hooked(make_lm(4).state_dict(), make_lm(4).cfg)
    torch.manual_seed(2)
    transcoder = Transcoder(TranscoderConfig(d_in=32, d_sae=40, d_out=32, apply_b_dec_to_input=False, metadata=SAEMetadata(
        hook_name="blocks.0.hook_resid_mid", hook_name_out="blocks.0.hook_resid_post", model_name="tiny")))
    tokens = np.random.default_rng(3).integers(0, 256, (6, 16))
    inputs, scored = mask_tokens(tokens, 0.2, 257, 0)
    for sae in (topk_sae(), topk_sae("blocks.1.hook_resid_pre"), transcoder):
        sp = Spliced(sae)
        entry, _ = entry_hook(sp, model.cfg.n_layers)
        with torch.inference_mode():
            _, cache = model.run_with_cache(torch.as_tensor(inputs), names_filter=[entry])
        got = spliced_losses(model, sp, inputs, tokens, scored, "cpu", 4, cache[entry])  # as the probe keeps it
        want = spliced_losses(model, sp, inputs, tokens, scored, "cpu", 4)
        assert got["zero"] > got["sae"] > 0
        for k in want:
            assert got[k] == pytest.approx(want[k], rel=1e-5), (sp.out_hook, k)


def test_logits_go_through_the_final_norm_when_it_can_be_folded():
    from reportgen.probes.sae import Spliced, logit_tables

    model = to_hooked(make_lm(4).state_dict(), make_lm(4).cfg)
    sae = topk_sae()
    t = logit_tables(model, Spliced(sae), k=3)
    D = sae.W_dec.detach()
    if model.cfg.normalization_type in ("LN", "LNPre"):
        D = D - D.mean(-1, keepdim=True)
    if model.cfg.normalization_type in ("LN", "RMS"):
        D = D * model.ln_final.w.detach()
        assert "final norm's" in t["logit_how"]
    E = D @ model.W_U.detach()
    assert (t["logit_pos_ids"] == E.topk(3, dim=1).indices.numpy()).all()
    assert np.allclose(t["logit_neg"], -(-E).topk(3, dim=1).values.numpy(), atol=1e-5)


def test_memory_of_the_stream_does_not_grow_with_tokens():
    from reportgen.probes.sae import FeatureStream

    st = FeatureStream(d=300, T=16, top_k=4, reservoir=6, context=2, cooc_tokens=64, device="cpu")
    sizes = []
    g = torch.Generator().manual_seed(0)
    for b in range(30):
        f = torch.relu(torch.randn(32, 300, generator=g) - 2.0)
        st.update(f, b * 32)
        if b in (4, 29):
            sizes.append(sum(t.numel() * t.element_size() for t in (st.count, st.sum, st.max, st.hist, st.top.win,
                                                                      st.sample.win)) + sum(c.numel() for c in st.cooc))
    assert sizes[0] == sizes[1]  # the kept codes stop at cooc_tokens; everything else is per feature
    r = st.result()
    assert r["n_tokens"] == 960 and r["cooc_tokens"] == 64


@pytest.mark.parametrize("case,needle", [
    ("arch", "architecture 'mystery' is not one SAELens"),
    ("out_hook", "blocks.7.hook_mlp_out, a hook point this model does not have"),
    ("prompt", "longer than the model's context (64)"),
    ("ids", "feature id 999 is out of range"),
])
def test_sae_bad_input_is_one_line_exit_2(sae_case, tmp_path, case, needle):
    ckpt, text, saes, _ = sae_case
    import shutil

    folder = tmp_path / "sae"
    shutil.copytree(saes["transcoder-mlp" if case == "out_hook" else "topk-resid_post"], folder)
    extra = []
    cfg = json.loads((folder / "cfg.json").read_text())
    if case == "arch":
        cfg["architecture"] = "mystery"
    elif case == "out_hook":
        cfg["metadata"]["hook_name_out"] = "blocks.7.hook_mlp_out"
    elif case == "prompt":
        extra = ["--prompt", "x" * 65]
    elif case == "ids":
        extra = ["--param", "sae_features.ids=3,999"]
    (folder / "cfg.json").write_text(json.dumps(cfg))
    out = tmp_path / "site"
    r = run_cli("--ckpt", ckpt, "--data", text, "--seq-len", "32", "--only", "sae_features", "--sae", folder, "--out", out,
                "--format", "html", *extra)
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith("reportgen: error: ") and needle in lines[-1], r.stderr
    assert not list(out.glob("*/*/index.html"))


def test_hover_shows_the_activation_and_predictions_in_a_real_browser(sae_case, tmp_path):
    """Headless Chromium runs the page's own script: a token's hover box shows its activation and the model's
    top predictions there; sorting the index puts the densest feature first."""
    import shutil

    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("no Chromium installed (the README's test set-up installs it)")
    ckpt, text, saes, _ = sae_case
    out = tmp_path / "site"
    r = run_cli("--ckpt", ckpt, "--data", text, "--seq-len", "32", "--only", "sae_features", "--sae", saes["topk-resid_post"],
                "--out", out, "--format", "html", "--param", "sae_features.n_features=2")
    assert r.returncode == 0, r.stderr
    rep = out / "run" / "step_5"
    page = (rep / "index.html").read_text()
    assert "<script src" not in page and "http" not in page.split("<script>", 1)[1]
    data = json.loads((rep / "data" / "sae_features.json").read_text())
    x = data["features"][0]["examples"][0]
    tr = np.load(rep / "data" / "trace.npz")
    probe = """<script>
window.addEventListener("load", function () {
  var ctx = document.querySelector('#feature-%d .ctx[data-o="%d"]');
  ctx.dispatchEvent(new MouseEvent("mouseover", {bubbles: true}));
  var tok = ctx.getElementsByTagName("i")[%d];
  tok.dispatchEvent(new MouseEvent("mouseover", {bubbles: true}));
  var out = document.createElement("pre"); out.id = "probe-out";
  out.textContent = document.querySelector(".rg-tip").textContent;
  document.querySelector("table[data-sort] th:nth-child(2)").click();
  out.textContent += "\\nFIRST " + document.querySelector("table[data-sort] tbody tr td").textContent;
  document.body.appendChild(out);
});
</script></body>""" % (data["features"][0]["id"], x["o"], x["at"])
    (rep / "probe.html").write_text(page.replace("</body>", probe))
    dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                          "--no-first-run", "--virtual-time-budget=5000", "--dump-dom", f"file://{rep / 'probe.html'}"],
                         capture_output=True, text=True, timeout=120).stdout
    shown = dom.split('<pre id="probe-out">', 1)[1].split("</pre>", 1)[0]
    act = x["a"][x["at"]]
    assert f"activation {act:.3g}" in shown
    # the model's top prediction at that token, from the trace's own forward pass
    model = to_hooked(make_lm(3).state_dict(), make_lm(3).cfg)
    with torch.no_grad():
        probs = model(torch.as_tensor(tr["inputs"][x["sequence"]:x["sequence"] + 1]))[0, x["position"]].softmax(-1)
    top = VOCAB[int(probs.argmax())]
    said = shown.replace("&quot;", '"').split("model predicts: ", 1)[1].split("\n")[0]
    first, pct = said.split(", ")[0].rsplit(" ", 1)
    assert first == json.dumps(top) and abs(int(pct.rstrip("%")) - float(probs.max()) * 100) <= 1  # stored in 1/255
    dens = max(data["saes"][0]["index"], key=lambda r: r["density"])
    assert f"FIRST {dens['id']}" in shown
