"""Sparse-autoencoder features, for one or more SAEs (or transcoders) of SAELens.

Per SAE: reconstruction quality (explained variance at the hook the SAE writes to; the loss with the SAE
spliced in against the clean and the zero-ablated model), L0, the feature-density histogram with dead and
dense features counted, an index of every live feature, and a card per chosen feature: its top-activating
contexts, examples from quantile intervals of its activation distribution (marked on its histogram), the
loss change of ablating it on its top contexts, its top and bottom logits through the unembedding, its
nearest features by decoder cosine similarity and the features it fires with most. Optional prompts get a
token × feature view.

Everything here is numpy over the probe's streamed statistics (reportgen/probes/sae.py); the histograms are
drawn as SVG directly and as small SVG images in the cards (no matplotlib), which keeps hundreds of cards fast.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache, partial

import numpy as np

from reportgen.probes.sae import bin_edges  # numpy only: the probe's torch imports are inside its functions
from reportgen.figures import ACCENT, BAD, INK, MUTED, Canvas, Figure, power_of_ten
from reportgen.stats import Z95, metric

NAME = "sae_features"
METRICS = {"sae_l0": ("SAE L0", "num"), "sae_explained_variance": ("SAE expl. var.", "pct")}
TITLE = "Sparse autoencoder features"
SUBJECTS = ("lm",)
RANKS = ("default", "mean", "max", "density")
SCRIPT = True  # the page script adds hover, sorting and jumping to the cards and the index


def _ids(v) -> list:
    if isinstance(v, str):
        v = [x for x in v.replace(" ", "").split(",") if x]
    try:
        return [int(x) for x in v]
    except (TypeError, ValueError):
        raise ValueError(f"ids must be feature numbers, like ids=3,17,200 (not {v!r})") from None


@dataclass
class Params:
    n_features: int = 32  # feature cards (per SAE)
    rank_by: str = "default"  # default (mean activation, leaving out dense and dead features) | mean | max | density
    dense: float = 0.10  # the default ranking leaves out features firing on more than this share of tokens
    ids: list = field(default_factory=list)  # explicit feature ids instead of a ranking (ids=3,17,200)
    examples: int = 8  # top-activating contexts per feature
    intervals: int = 10  # quantile intervals of the activation distribution, with examples from each
    interval_examples: int = 2  # examples per interval
    context: int = 6  # tokens on each side of the activating token
    bins: int = 24  # bins of each feature's activation histogram
    logits: int = 8  # top / bottom logit tokens per feature
    neighbours: int = 5  # nearest features by decoder cosine similarity, and co-occurring features
    ablate: int = 1  # top contexts per card on which the feature is ablated (0: none)
    loss_seqs: int = 8  # sequences for the spliced-in and zero-ablated loss
    variance_seqs: int = 64  # sequences the explained variance is measured on (a dense decode costs an encode)
    cooc_tokens: int = 131072  # tokens whose codes are kept for co-occurrence
    predictions: int = 3  # the model's top predictions kept at every token (shown on hover; 0: none)
    prompts: list = field(default_factory=list)  # prompt texts for the token × feature view (--prompt)
    prompt_features: int = 5  # features shown per prompt token
    index: bool = True  # the table of every live feature
    pdf_cards: int = 8  # cards the PDF shows (top 4 contexts, one per interval; the HTML shows all in full)

    def __post_init__(self):
        if self.rank_by not in RANKS:
            raise ValueError(f"rank_by must be one of {', '.join(RANKS)}")
        if self.n_features < 1 or self.examples < 1 or self.context < 0 or self.bins < 2 or self.logits < 1:
            raise ValueError("n_features, examples, logits must be >= 1, bins >= 2, context >= 0")
        if self.loss_seqs < 0 or self.variance_seqs < 1 or self.intervals < 0 or self.interval_examples < 0:
            raise ValueError("loss_seqs, intervals, interval_examples must be >= 0 and variance_seqs >= 1")
        if not 0 < self.dense <= 1:
            raise ValueError("dense must be a share of tokens in (0, 1]")
        if self.pdf_cards < 0:
            raise ValueError("pdf_cards must be >= 0")
        if self.ablate < 0 or self.neighbours < 0 or self.predictions < 0 or self.prompt_features < 1:
            raise ValueError("ablate, neighbours, predictions must be >= 0 and prompt_features >= 1")
        self.ids = _ids(self.ids)
        self.prompts = [self.prompts] if isinstance(self.prompts, str) else [str(p) for p in self.prompts]


def needs(params: Params) -> dict:
    return {"sae": {"loss_seqs": params.loss_seqs, "variance_seqs": params.variance_seqs, "top_k": params.examples,
                    "reservoir": max(params.intervals * max(params.interval_examples, 1) * 3, 1),
                    "context": params.context, "cooc_tokens": params.cooc_tokens, "top_predictions": params.predictions,
                    "logits": params.logits, "neighbours": max(params.neighbours, 1), "ablate": params.ablate,
                    "cards": len(params.ids) if params.ids else params.n_features,
                    "choose": partial(choose, params), "prompts": params.prompts,
                    "prompt_features": params.prompt_features}}


def choose(params: Params, s: dict) -> list[int]:
    """The features that get cards: the given ids, or the top n_features by the ranking (live features only;
    the default ranking also leaves out dense ones)."""
    count, d = s["count"], len(s["count"])
    bad = [f for f in params.ids if not 0 <= f < d]
    if bad:
        raise ValueError(f"feature id {bad[0]} is out of range (the SAE at {s['hook']} has features 0..{d - 1})")
    if params.ids:
        return list(dict.fromkeys(params.ids))
    n = max(s["n_tokens"], 1)
    density = count / n
    key = {"default": s["sum"] / n, "mean": s["sum"] / n, "max": s["max"], "density": density}[params.rank_by]
    ok = count > 0
    if params.rank_by == "default":
        ok &= density <= params.dense
    order = np.lexsort((np.arange(d), -key))
    return [int(j) for j in order[ok[order]][: params.n_features]]


def compute(trace, params: Params) -> dict:
    blocks = [_one(trace, s, params, i) for i, s in enumerate(trace.sae)]
    first = blocks[0]
    hover = _hover(trace, blocks)
    return {"hover": hover, **{k: first[k] for k in ("hook", "d_in", "d_sae", "tokens", "l0", "l0_metric", "explained_variance",
                                      "variance_tokens", "losses", "loss_sequences", "ce_recovered", "dead", "alive",
                                      "density_histogram", "features")},
            "rank_by": "given ids" if params.ids else params.rank_by, "dense_threshold": params.dense, "saes": blocks,
            "pdf_cards": params.pdf_cards}


def _one(trace, s: dict, params: Params, i: int) -> dict:
    N, T = trace.inputs.shape
    flat = trace.inputs.reshape(-1)
    voc = np.array(list(trace.vocab), dtype=object)  # looked up by many ids at once in the contexts
    n_tok, d = int(s["n_tokens"]), int(s["d_sae"])
    count = s["count"]
    density = count / max(n_tok, 1)
    mean_act = s["sum"] / max(n_tok, 1)
    alive = count > 0
    dense = alive & (density > params.dense)
    prefix = f"s{i}-" if len(trace.sae) > 1 else ""
    chosen = s["chosen"]
    carded = set(chosen)
    cooc = _Cooc(s["cooc"], d).top(chosen, params.neighbours)
    feats = [_card(j, s, params, flat, T, voc, density, mean_act, cooc[j], carded, prefix) for j in chosen]
    lo10 = np.log10(density[alive]) if alive.any() else np.zeros(0)
    floor = np.floor(np.log10(1.0 / max(n_tok, 1)))
    dh, de = np.histogram(lo10, bins=np.linspace(floor, 0, 25))
    losses = s["losses"]
    rec = None
    if {"clean", "sae", "zero"} <= set(losses) and losses["zero"] != losses["clean"]:
        rec = (losses["zero"] - losses["sae"]) / (losses["zero"] - losses["clean"])
    index = []
    if params.index:
        top_tok = s["top_tok"][:, 0]
        for j in np.flatnonzero(alive):
            t = int(top_tok[j])
            index.append({"id": int(j), "density": float(density[j]), "max": float(s["max"][j]),
                          "mean": float(mean_act[j]), "top": voc[int(flat[t])] if t >= 0 else "", "card": int(j) in carded,
                          "dense": bool(dense[j])})
    h = Z95 * s["l0_std"] / np.sqrt(n_tok) if n_tok > 1 else None
    l0m = metric(s["l0"], n_tok, None if h is None else s["l0"] - h, None if h is None else s["l0"] + h,
                 "normal" if h is not None else "none")
    out = {
        "label": s.get("name") or s["hook"], "prefix": prefix, "hook": s["hook"], "out_hook": s["out_hook"],
        "transcoder": bool(s["transcoder"]), "architecture": s["architecture"], "head": s["head"],
        "d_in": int(s["d_in"]), "d_sae": d, "tokens": n_tok, "l0": float(s["l0"]), "l0_metric": l0m,
        "explained_variance": float(s["explained_variance"]), "variance_tokens": int(s["variance_tokens"]),
        "losses": {k: float(v) for k, v in losses.items()}, "loss_sequences": int(s["loss_seqs"]), "ce_recovered": rec,
        "dead": int((~alive).sum()), "alive": int(alive.sum()), "dense": int(dense.sum()),
        "density_histogram": {"counts": dh.astype(int).tolist(), "edges": [round(float(e), 3) for e in de]},
        "logit_how": s["logit_how"], "cooc_tokens": int(s["cooc_tokens"]), "features": feats, "index": index,
        "prompts": [_prompt(p, voc, carded, prefix) for p in s.get("prompts", [])],
    }
    return out


def _hover(trace, blocks: list) -> dict | None:
    """The model's top predictions at every token the cards show, for the page's script: sorted flat positions
    (omitted when every activation token is shown), then per position k token ids and k probabilities in 1/255,
    little-endian, base64; with the strings of the tokens they name."""
    import base64

    tp = trace.token_predictions
    if tp is None:
        return None
    ids, probs = tp["ids"], tp["probs"]
    n, T, k = ids.shape
    starts, lens = [], []
    for b in blocks:
        for f in b["features"]:
            for x in f["examples"] + [e for iv in f["intervals"] for e in iv["examples"]]:
                starts.append(x["o"])
                lens.append(len(x["t"]))
    lens = np.asarray(lens, np.int64)
    first = np.cumsum(lens) - lens  # each context's first entry in the flat list of its positions
    pos = np.repeat(np.asarray(starts, np.int64) - first, lens) + np.arange(int(lens.sum()), dtype=np.int64)
    pos = np.unique(pos[pos < n * T])  # sorted
    dense = len(pos) >= 0.4 * n * T
    if dense:
        pos = np.arange(n * T)
    fi, fp = ids.reshape(-1, k)[pos], probs.reshape(-1, k)[pos].astype(np.float32)
    used, inv = np.unique(fi, return_inverse=True)
    size = "<u1" if len(used) <= 256 else "<u2" if len(used) <= 65536 else "<u4"
    b64 = lambda a: base64.b64encode(np.ascontiguousarray(a).tobytes()).decode()  # noqa: E731
    return {"k": int(k), "pos": None if dense else b64(pos.astype("<u4")),
            "ids": b64(inv.reshape(-1).astype(size)), "bytes": int(size[-1]),
            "p": b64(np.clip(np.round(fp * 255), 0, 255).astype(np.uint8)), "tokens": [trace.vocab[int(t)] for t in used]}


class _Cooc:
    """Which features fire together, over the tokens whose codes the probe kept: (token, feature) pairs, as a
    sparse tokens x features matrix A; the counts for a set of features are rows of A^T A (a sparse product,
    in chunks of rows whose dense counts stay bounded)."""

    CHUNK = 1 << 22  # dense (feature, feature) counts held at once

    def __init__(self, pairs: np.ndarray, d: int):
        import scipy.sparse as sp  # sae_lens imports it already

        self.d = d
        tok, feat = pairs[:, 0].astype(np.int64), pairs[:, 1].astype(np.int64)
        if len(tok) > 1 and (tok[1:] < tok[:-1]).any():  # the probe writes them in token order
            o = np.argsort(tok, kind="stable")
            tok, feat = tok[o], feat[o]
        n_tok = int(tok.max()) + 1 if len(tok) else 0
        start = np.searchsorted(tok, np.arange(n_tok + 1))
        self.A = sp.csr_matrix((np.ones(len(feat), np.int32), feat, start), shape=(n_tok, d))  # int32: exact
        self.At = self.A.T.tocsr()
        self.n_fire = np.diff(self.At.indptr)

    def top(self, feats: list, k: int) -> dict:
        """For each feature j of feats: (tokens j fires on, [(feature, tokens both fire on)] of the k features
        firing with j most, ties to the lower id)."""
        out, rows = {}, max(1, self.CHUNK // max(self.d, 1))
        for lo in range(0, len(feats), rows):
            out.update(self._top(np.asarray(feats[lo:lo + rows], np.int64), k))
        return out

    def _top(self, fs: np.ndarray, k: int) -> dict:
        counts = (self.At[fs] @ self.A).toarray().astype(np.int64)
        counts[np.arange(len(fs)), fs] = 0
        kk = min(k, self.d)
        if kk:  # the kk largest counts per row, ties to the lower id: a unique key, partitioned then sorted
            key = counts * self.d + (self.d - 1 - np.arange(self.d))
            part = np.argpartition(-key, kk - 1, axis=1)[:, :kk]
            best = np.take_along_axis(part, np.argsort(-np.take_along_axis(key, part, 1), axis=1), 1)
        else:
            best = np.zeros((len(fs), 0), np.int64)
        return {int(j): (int(self.n_fire[j]), [(int(f), int(counts[r, f])) for f in best[r] if counts[r, f] > 0])
                for r, j in enumerate(fs.tolist())}


def _contexts(toks, wins: np.ndarray, acts, flat, T: int, voc: np.ndarray) -> list[dict]:
    """Context windows around flat token indices `toks`: per window its tokens' strings `t` and the feature's
    activations on them `a` (from `wins` [n, 2c+1], NaN only beyond the sequence); `at` is the activating
    token's index in it, `o` the flat index of its first token. One numpy pass for all of them."""
    toks = np.asarray(toks, np.int64).reshape(-1)
    if not len(toks):
        return []
    c = (wins.shape[1] - 1) // 2
    seq, pos = np.divmod(toks, T)
    lo, hi = np.maximum(pos - c, 0), np.minimum(pos + c + 1, T)
    ids = voc[flat[np.minimum(np.maximum(toks[:, None] + np.arange(-c, c + 1), 0), len(flat) - 1)]].tolist()
    A = np.round(wins.astype(np.float64), 3).tolist()
    out = []
    for i, (sq, p, a, b, act) in enumerate(zip(seq.tolist(), pos.tolist(), lo.tolist(), hi.tolist(), acts)):
        s0, e0 = a - p + c, b - p + c
        out.append({"sequence": sq, "position": p, "activation": round(float(act), 4), "start": a, "o": sq * T + a,
                    "t": ids[i][s0:e0], "a": A[i][s0:e0], "at": p - a})
    return out


def _card(j, s, params, flat, T, voc, density, mean_act, cooc, carded, prefix) -> dict:
    abl = s["ablation"].get(j, {})
    tt = s["top_tok"][j]
    n_ex = int((tt >= 0).sum())  # rows are sorted best first, the unused ones (-1) last
    examples = _contexts(tt[:n_ex], s["top_win"][j][:n_ex], s["top_val"][j][:n_ex], flat, T, voc)
    c = params.context
    for t, x in zip(tt[:n_ex].tolist(), examples):
        if t in abl:
            i0 = x["start"] - x["position"] + c
            x["ablation"] = [None if np.isnan(e) else round(float(e), 4) for e in abl[t][i0:i0 + len(x["t"])]]
    hist = s["hist"][j]
    fires = int(s["count"][j])
    top_max = float(s["max"][j])
    edges, log_edges = _edges()
    intervals = []
    if params.intervals and params.interval_examples and fires > len(examples):
        sv, st, sw = s["sample_val"][j], s["sample_tok"][j], s["sample_win"][j]
        qs = _quantiles(hist, log_edges, _grid(params.intervals), top_max)
        K, q = params.intervals, np.asarray(qs)
        which = np.searchsorted(q[1:-1], sv, side="right")  # 0 .. K-1
        # each interval's first samples (the sample is in random order), then best first within an interval
        every = np.flatnonzero((st >= 0) & (sv >= q[which]))
        every = every[np.argsort(which[every], kind="stable")]
        w = which[every]
        every = every[np.arange(len(w)) - np.searchsorted(w, w) < params.interval_examples]  # rank in its interval
        w = which[every]
        o = np.lexsort((st[every], -sv[every], w))
        every, w = every[o], w[o]
        ctx = iter(_contexts(st[every], sw[every], sv[every].tolist(), flat, T, voc))
        for k, n in enumerate(np.bincount(w, minlength=K).tolist()):
            intervals.append({"lo": qs[k], "hi": qs[k + 1], "share": 1.0 / K, "examples": [next(ctx) for _ in range(n)]})
    # the card's histogram: linear bins over [0, max], from the fine log bins (each at its geometric centre)
    centres = np.sqrt(edges[:-1] * edges[1:])
    nb = params.bins
    idx = np.minimum((centres / max(top_max, 1e-30) * nb).astype(np.int64), nb - 1)
    counts = np.bincount(idx, weights=hist, minlength=nb).astype(int)
    marks = [iv["lo"] / top_max for iv in intervals[1:]] if top_max > 0 else []
    n_seen, together = cooc
    k = params.logits
    card = {
        "id": int(j), "anchor": f"{prefix}feature-{j}", "density": float(density[j]),
        "mean_activation": float(mean_act[j]), "max_activation": top_max, "fires": fires, "examples": examples,
        "intervals": intervals,
        "histogram": {"counts": counts.tolist(), "edges": [0.0, round(top_max, 4)], "marks": [round(m, 4) for m in marks]},
        "logits_pos": [{"token": voc[int(t)], "id": int(t), "value": round(float(x), 4)}
                       for t, x in zip(s["logit_pos_ids"][j][:k], s["logit_pos"][j][:k])],
        "logits_neg": [{"token": voc[int(t)], "id": int(t), "value": round(float(x), 4)}
                       for t, x in zip(s["logit_neg_ids"][j][:k], s["logit_neg"][j][:k])],
        "neighbours": [{"id": int(f), "cos": round(float(c), 3), "card": int(f) in carded}
                       for f, c in zip(s["near_ids"][j][: params.neighbours], s["near_cos"][j][: params.neighbours])],
        "cooccurring": [{"id": f, "n": n, "share": round(n / max(n_seen, 1), 4), "card": f in carded} for f, n in together],
        "cooc_fires": int(n_seen),
    }
    if s.get("head_shares") is not None:
        card["heads"] = [round(float(x), 3) for x in s["head_shares"][j]]
    return card


def _quantiles(hist: np.ndarray, le: np.ndarray, qs: np.ndarray, top: float) -> list:
    """Activation values at the quantiles qs of a feature's log-binned histogram (log-linear within a bin; `le`
    the log10 of the bins' edges); the last is the feature's maximum."""
    total = hist.sum()
    if not total:
        return [0.0] * len(qs)
    cdf = np.concatenate([[0], np.cumsum(hist)]) / total
    first = int(np.flatnonzero(hist)[0])
    i = np.minimum(np.maximum(np.searchsorted(cdf, qs, side="left") - 1, first), len(hist) - 1)
    span = cdf[i + 1] - cdf[i]
    frac = np.divide(qs - cdf[i], span, out=np.zeros(len(qs)), where=span > 0)
    out = np.minimum(10 ** (le[i] + frac * (le[i + 1] - le[i])), top).tolist()
    out[-1] = top
    return out


@lru_cache(maxsize=1)
def _edges() -> tuple[np.ndarray, np.ndarray]:
    """The probe's histogram bin edges and their log10 (read-only)."""
    e = bin_edges()
    le = np.log10(e)
    e.flags.writeable = le.flags.writeable = False
    return e, le


@lru_cache(maxsize=8)
def _grid(k: int) -> np.ndarray:
    """Quantile levels 0, 1/k, ..., 1 (read-only)."""
    g = np.linspace(0, 1, k + 1)
    g.flags.writeable = False
    return g


def _prompt(p: dict, voc, carded, prefix) -> dict:
    rows = []
    for i, t in enumerate(p["tokens"]):
        feats = [{"id": int(f), "a": round(float(v), 3), "card": int(f) in carded}
                 for f, v in zip(p["ids"][i], p["vals"][i]) if v > 0]
        rows.append({"t": voc[int(t)], "features": feats,
                     "predictions": [{"t": voc[int(a)], "p": round(float(b), 3)} for a, b in zip(p["pred_ids"][i], p["pred_probs"][i])]})
    return {"tokens": rows}


def metrics(data: dict) -> dict:
    """Of the first SAE: L0 over every token (n tokens); explained variance over the variance tokens and dead
    features as counts (no interval); CE recovered over the loss sequences."""
    out = {"sae_l0": data["l0_metric"],
           "sae_explained_variance": metric(data["explained_variance"], data["variance_tokens"]),
           "sae_dead": metric(data["dead"], data["d_sae"])}
    if data["ce_recovered"] is not None:
        out["sae_ce_recovered"] = metric(data["ce_recovered"], data["loss_sequences"])
    return out


def figures(data: dict, params: Params) -> list[Figure]:
    blocks = data.get("saes") or [data]
    return [_density_figure(b, f"density{'-' + str(i) if i else ''}") for i, b in enumerate(blocks)]


def _density_figure(data: dict, name: str) -> Figure:
    h = data["density_histogram"]
    counts, edges = h["counts"], h["edges"]
    W, H, left, bottom, top = 560.0, 210.0, 48.0, 36.0, 14.0
    c = Canvas(W, H)
    pw, ph = W - left - 12, H - bottom - top
    peak = max(counts + [1])
    bw = pw / len(counts)
    for i, n in enumerate(counts):
        bh = ph * n / peak
        if n:
            c.rect(left + i * bw + 0.5, top + ph - bh, bw - 1, bh, fill=ACCENT)
    c.line(left, top + ph, left + pw, top + ph, stroke=INK)
    c.line(left, top, left, top + ph, stroke=INK)
    lo, hi = edges[0], edges[-1]
    for e in range(int(lo), int(hi) + 1):
        x = left + pw * (e - lo) / (hi - lo)
        c.line(x, top + ph, x, top + ph + 4, stroke=INK)
        c.text(x, top + ph + 12, power_of_ten(e), size=9)
    for frac in (0, 0.5, 1):
        y = top + ph * (1 - frac)
        c.line(left - 4, y, left, y, stroke=INK)
        c.text(left - 6, y, f"{round(peak * frac)}", size=9, anchor="end")
    c.text(left + pw / 2, H - 8, "feature firing frequency (fraction of tokens, log scale)", size=10, fill=MUTED)
    c.text(left + pw - 4, top + 6, f"{data['dead']} dead of {data['d_sae']}", size=10, anchor="end",
           fill=BAD if data["dead"] else MUTED, bold=True)
    where = f" ({data['hook']})" if data.get("hook") else ""
    cap = (f"Feature density{where}: how often each of the {data['alive']} live features fires over {data['tokens']:,} tokens "
           f"(log10 of the firing frequency). {data['dead']} features never fire (dead) and are not in the histogram. "
           f"Mean L0 (features active per token): {data['l0']:.1f}.")
    return Figure(name, cap, c, alt="feature density histogram")
