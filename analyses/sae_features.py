"""Sparse-autoencoder features: reconstruction quality (explained variance; the loss with the SAE
spliced in against the clean and the zero-ablated model), L0, the feature-density histogram with
dead features counted, and the top features, each as a card: its top-activating contexts with
per-token highlighting, its activation histogram and its direct logit effects (W_dec·W_U).

The probe keeps the SAE codes of every token sparsely (token, feature, value); everything here is
numpy over those triples, so statistics cost little next to the model pass. The histograms are drawn
as SVG directly and as HTML bars in the cards (no matplotlib), which keeps 32 cards fast.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from reportgen.figures import ACCENT, BAD, INK, MUTED, Canvas, Figure, power_of_ten
from reportgen.stats import Z95, metric

NAME = "sae_features"
METRICS = {"sae_l0": ("SAE L0", "num"), "sae_explained_variance": ("SAE expl. var.", "pct")}
TITLE = "Sparse autoencoder features"
SUBJECTS = ("lm",)
RANKS = ("mean", "max", "density")


@dataclass
class Params:
    n_features: int = 32  # feature cards
    rank_by: str = "mean"  # mean | max | density (over all evaluation tokens)
    features: list = field(default_factory=list)  # explicit feature ids instead of a ranking
    examples: int = 8  # top-activating contexts per feature
    context: int = 8  # tokens on each side of the activating token
    bins: int = 24  # bins of each feature's activation histogram
    logits: int = 8  # top positive / negative logit tokens per feature
    loss_seqs: int = 8  # sequences for the spliced-in and zero-ablated loss (two extra passes from the hook on)
    variance_seqs: int = 64  # sequences the explained variance is measured on (a dense decode costs an encode)

    def __post_init__(self):
        if self.rank_by not in RANKS:
            raise ValueError(f"rank_by must be one of {', '.join(RANKS)}")
        if self.n_features < 1 or self.examples < 1 or self.context < 0 or self.bins < 2 or self.logits < 1:
            raise ValueError("n_features, examples, logits must be >= 1, bins >= 2, context >= 0")
        if self.loss_seqs < 0 or self.variance_seqs < 1:
            raise ValueError("loss_seqs must be >= 0 and variance_seqs >= 1")
        self.features = [int(f) for f in self.features]


def needs(params: Params) -> dict:
    return {"sae": {"loss_seqs": params.loss_seqs, "variance_seqs": params.variance_seqs}}


def compute(trace, params: Params) -> dict:
    s = trace.sae
    N, T = trace.inputs.shape
    n_tok, d = int(s["n_tokens"]), int(s["d_sae"])
    rows, cols, vals = s["rows"], s["cols"], s["vals"]
    key = cols.astype(np.uint16) if d <= 65536 else cols  # 16-bit keys: numpy's stable sort is a radix sort
    order = np.argsort(key, kind="stable")  # rows stay ascending within each feature
    counts = np.bincount(cols, minlength=d)
    starts = np.concatenate([[0], np.cumsum(counts)])
    sv, sr = vals[order], rows[order]
    sums = np.bincount(cols, weights=vals, minlength=d)
    maxs = np.zeros(d)
    alive = counts > 0
    if alive.any():
        maxs[alive] = np.maximum.reduceat(sv, starts[:-1][alive])
    density = counts / n_tok
    mean_act = sums / n_tok
    bad = [f for f in params.features if not 0 <= f < d]
    if bad:
        raise ValueError(f"feature id {bad[0]} is out of range (the SAE has {d} features)")
    if params.features:
        chosen = params.features
    else:
        key = {"mean": mean_act, "max": maxs, "density": density}[params.rank_by]
        chosen = [int(j) for j in np.lexsort((np.arange(d), -key))[: params.n_features] if counts[j] > 0]
    voc = trace.vocab
    feats = []
    for j in chosen:
        r, v = sr[starts[j]:starts[j + 1]], sv[starts[j]:starts[j + 1]]
        top = np.lexsort((r, -v))[: params.examples]
        examples = []
        for i in top:
            seq, pos = divmod(int(r[i]), T)
            lo, hi = max(0, pos - params.context), min(T, pos + params.context + 1)
            flat = seq * T + np.arange(lo, hi)
            at = np.searchsorted(r, flat)
            hitm = (at < len(r)) & (r[np.minimum(at, len(r) - 1)] == flat)
            acts = np.where(hitm, v[np.minimum(at, len(r) - 1)], 0.0)
            examples.append({"sequence": seq, "position": pos, "activation": round(float(v[i]), 4),
                             "tokens": [{"t": voc[int(t)], "a": round(float(a), 3)} for t, a in zip(trace.inputs[seq, lo:hi], acts)],
                             "at": pos - lo})
        hist, edges = np.histogram(v, bins=params.bins) if len(v) else (np.zeros(params.bins, int), np.linspace(0, 1, params.bins + 1))
        k = params.logits
        feats.append({
            "id": int(j), "density": float(density[j]), "mean_activation": float(mean_act[j]), "max_activation": float(maxs[j]),
            "fires": int(counts[j]), "examples": examples,
            "histogram": {"counts": hist.astype(int).tolist(), "edges": [round(float(e), 4) for e in edges]},
            "logits_pos": [{"token": voc[int(t)], "id": int(t), "value": round(float(x), 4)}
                           for t, x in zip(s["logit_pos_ids"][j][:k], s["logit_pos"][j][:k])],
            "logits_neg": [{"token": voc[int(t)], "id": int(t), "value": round(float(x), 4)}
                           for t, x in zip(s["logit_neg_ids"][j][:k], s["logit_neg"][j][:k])],
        })
    lo10 = np.log10(density[alive]) if alive.any() else np.zeros(0)
    floor = np.floor(np.log10(1.0 / n_tok))
    dh, de = np.histogram(lo10, bins=np.linspace(floor, 0, 25))
    losses = s["losses"]
    rec = None
    if {"clean", "sae", "zero"} <= set(losses) and losses["zero"] != losses["clean"]:
        rec = (losses["zero"] - losses["sae"]) / (losses["zero"] - losses["clean"])
    return {
        "hook": s["hook"], "d_in": s["d_in"], "d_sae": d, "tokens": n_tok,
        "l0": float(len(vals) / n_tok), "l0_metric": _l0_metric(rows, n_tok), "explained_variance": float(s["explained_variance"]),
        "variance_tokens": int(s["variance_tokens"]),
        "losses": {k: float(v) for k, v in losses.items()}, "loss_sequences": int(s["loss_seqs"]), "ce_recovered": rec,
        "dead": int((~alive).sum()), "alive": int(alive.sum()),
        "density_histogram": {"counts": dh.astype(int).tolist(), "edges": [round(float(e), 3) for e in de]},
        "rank_by": "given ids" if params.features else params.rank_by, "features": feats,
    }


def _l0_metric(rows: np.ndarray, n_tok: int) -> dict:
    """Mean active features per token over every token, with a normal-approximation 95% interval (the per-token
    counts are many and bounded; a bootstrap would cost more than the statistics here)."""
    per_token = np.bincount(rows, minlength=n_tok).astype(np.float64)
    m = float(per_token.mean()) if n_tok else None
    h = Z95 * float(per_token.std(ddof=1)) / np.sqrt(n_tok) if n_tok > 1 else None
    return metric(m, n_tok, None if h is None else m - h, None if h is None else m + h, "normal" if h is not None else "none")


def metrics(data: dict) -> dict:
    """L0 over every token (n tokens); explained variance over the variance tokens and dead features of the
    SAE's features as counts (no interval); CE recovered over the loss sequences."""
    out = {"sae_l0": data["l0_metric"],
           "sae_explained_variance": metric(data["explained_variance"], data["variance_tokens"]),
           "sae_dead": metric(data["dead"], data["d_sae"])}
    if data["ce_recovered"] is not None:
        out["sae_ce_recovered"] = metric(data["ce_recovered"], data["loss_sequences"])
    return out


def figures(data: dict, params: Params) -> list[Figure]:
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
    cap = (f"Feature density: how often each of the {data['alive']} live features fires over {data['tokens']:,} tokens "
           f"(log10 of the firing frequency). {data['dead']} features never fire (dead) and are not in the histogram. "
           f"Mean L0 (features active per token): {data['l0']:.1f}.")
    return [Figure("density", cap, c, alt="feature density histogram")]
