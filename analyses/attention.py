"""Attention: heatmaps per layer (mean over heads) and per head for one sequence with its tokens as
labels, and attention entropy per layer and head over every query position of every sequence:
mean, std, min, max, with seed 001's reading (focused < 1.0 nats, diffuse > 2.0 nats).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from reportgen.figures import Figure, mpl_figure
from reportgen.lm import show_token
from reportgen.stats import bootstrap_mean

NAME = "attention"
TITLE = "Attention patterns and entropy"
SUBJECTS = ("lm",)


@dataclass
class Params:
    sample: int = 0  # sequence whose patterns are drawn
    max_tokens: int = 48  # positions shown in the heatmaps (the entropy uses all)
    focused: float = 1.0  # entropy below this (nats): focused attention
    diffuse: float = 2.0  # entropy above this: diffuse attention
    heads: bool = True  # also draw every head as small multiples

    def __post_init__(self):
        if self.sample < 0 or self.max_tokens < 2:
            raise ValueError("sample must be >= 0 and max_tokens >= 2")
        if not 0 <= self.focused < self.diffuse:
            raise ValueError("need 0 <= focused < diffuse")


def needs(params: Params) -> dict:
    return {"attention": {"sample": params.sample, "positions": params.max_tokens}}


def reading(e: float, p: Params) -> str:
    return "focused" if e < p.focused else "diffuse" if e > p.diffuse else "normal"


def compute(trace, params: Params) -> dict:
    a = trace.attention
    n = min(params.max_tokens, a["pattern"].shape[-1])  # the probe keeps only the shown window
    pat = a["pattern"][:, :, :n, :n]  # [L,H,n,n]
    ids = trace.inputs[a["sample"], :n]
    heads = []
    for li in range(trace.n_layers):
        for h in range(trace.n_heads):
            m = float(a["mean"][li, h])
            heads.append({"layer": li, "head": h, "mean": m, "std": float(a["std"][li, h]), "min": float(a["min"][li, h]),
                          "max": float(a["max"][li, h]), "reading": reading(m, params)})
    layers = []
    for li in range(trace.n_layers):
        m = float(a["mean"][li].mean())
        layers.append({"layer": li, "mean": m, "min": float(a["min"][li].min()), "max": float(a["max"][li].max()),
                       "reading": reading(m, params)})
    overall = float(a["mean"].mean())
    per_seq = a["per_sequence"]  # [n_act, L, H] mean entropy over each sequence's query rows
    return {
        "sample": int(a["sample"]), "positions": int(n), "seq_len": int(a["seq_len"]),
        "tokens": [trace.vocab[int(t)] for t in ids], "token_ids": [int(t) for t in ids],
        "causal": bool(trace.causal), "query_rows": int(a["rows"]),
        "thresholds": {"focused": params.focused, "diffuse": params.diffuse},
        "entropy": {"mean": overall, "reading": reading(overall, params), "layers": layers, "heads": heads,
                    # mean over all heads with a bootstrap interval over the sequences (rows of one sequence are not
                    # independent); n = sequences
                    "metric": bootstrap_mean(per_seq.reshape(len(per_seq), -1).mean(1)), "sequences": int(len(per_seq))},
        "uniform_entropy": float(np.log(a["seq_len"])),
        "pattern_mean_over_heads": np.round(pat.mean(1), 4).tolist(),  # [L][q][k]
        "pattern_heads": np.round(pat, 4).tolist(),  # [L][H][q][k]
        "draw_heads": params.heads,
    }


def metrics(data: dict) -> dict:
    return {"attention_entropy": data["entropy"]["metric"]}


def figures(data: dict, params: Params) -> list[Figure]:
    L = len(data["pattern_mean_over_heads"])
    labels = [show_token(t) or "·" for t in data["tokens"]]
    n = len(labels)
    cols = min(L, 2)
    rows = -(-L // cols)
    fig, axes = mpl_figure(rows, cols, size=(6.6, 3.3 * rows))
    fig.subplots_adjust(left=0.07, right=0.9, bottom=0.06, top=1 - 0.3 / (3.3 * rows), wspace=0.25, hspace=0.3)
    tick = max(1, n // 24)
    im = None
    for li in range(rows * cols):
        ax = axes[li // cols][li % cols]
        if li >= L:
            ax.axis("off")
            continue
        im = ax.imshow(np.asarray(data["pattern_mean_over_heads"][li]), cmap="Blues", vmin=0, vmax=1,
                       interpolation="nearest", aspect="equal")
        ax.set_title(f"layer {li}", fontsize=8)
        ax.set_xticks(range(0, n, tick))
        ax.set_xticklabels(labels[::tick], fontsize=5, rotation=90)
        ax.set_yticks(range(0, n, tick))
        ax.set_yticklabels(labels[::tick], fontsize=5)
        ax.tick_params(length=0, pad=1)
    cax = fig.add_axes((0.92, 0.25, 0.015, 0.5))
    fig.colorbar(im, cax=cax).set_label("attention weight", fontsize=7)
    cap = (f"Attention of sequence {data['sample']} (first {n} of {data['seq_len']} positions), mean over heads, per layer. "
           f"Row = query token, column = key token it attends to; darker = more weight. "
           + ("Causal: the upper triangle is masked." if data["causal"] else "Bidirectional: every position sees every other."))
    out = [Figure("layers", cap, fig, alt="attention heatmaps per layer")]
    if data["draw_heads"]:
        H = len(data["pattern_heads"][0])
        fig2, ax2 = mpl_figure(L, H, size=(1.45 * H + 0.6, 1.45 * L + 0.35))
        fig2.subplots_adjust(left=0.5 / (1.45 * H + 0.6), right=0.98, bottom=0.05, top=1 - 0.3 / (1.45 * L + 0.35),
                             wspace=0.08, hspace=0.12)
        heads = {(h["layer"], h["head"]): h for h in data["entropy"]["heads"]}
        for li in range(L):
            for h in range(H):
                ax = ax2[li][h]
                ax.imshow(np.asarray(data["pattern_heads"][li][h]), cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                if li == 0:
                    ax.set_title(f"head {h}", fontsize=7)
                if h == 0:
                    ax.set_ylabel(f"layer {li}", fontsize=7)
                ax.text(0.97, 0.03, f"H={heads[(li, h)]['mean']:.2f}", transform=ax.transAxes, fontsize=5.5, ha="right",
                        va="bottom", color="#cf222e")
        out.append(Figure("heads", f"Every head's attention on the same {n} positions (rows: layers, columns: heads). "
                          "H: the head's mean attention entropy in nats over all sequences.", fig2,
                          alt="attention heatmaps per head"))
    ent = data["entropy"]["heads"]
    fig3, axes3 = mpl_figure(1, 1, size=(6.4, 2.4))
    ax = axes3[0][0]
    x = np.arange(len(ent))
    means = np.array([h["mean"] for h in ent])
    lo = means - np.array([h["min"] for h in ent])
    hi = np.array([h["max"] for h in ent]) - means
    colors = ["#1a7f37" if h["reading"] == "focused" else "#e16f24" if h["reading"] == "diffuse" else "#0969da" for h in ent]
    ax.bar(x, means, color=colors, width=0.7)
    ax.errorbar(x, means, yerr=[lo, hi], fmt="none", ecolor="#6e7781", elinewidth=0.8, capsize=1.5)
    ax.axhline(data["thresholds"]["focused"], ls="--", lw=0.8, color="#1a7f37")
    ax.axhline(data["thresholds"]["diffuse"], ls="--", lw=0.8, color="#e16f24")
    ax.axhline(data["uniform_entropy"], ls=":", lw=0.8, color="#6e7781")
    ax.set_xticks(x)
    ax.set_xticklabels([f"L{h['layer']}H{h['head']}" for h in ent], fontsize=5.5, rotation=90)
    ax.set_ylabel("entropy (nats)")
    cap = (f"Attention entropy per head over {data['query_rows']:,} query positions: bar = mean, whisker = min to max. "
           f"Green: focused (mean < {data['thresholds']['focused']}), orange: diffuse (> {data['thresholds']['diffuse']}), "
           f"blue: between. Dotted: a uniform row over {data['seq_len']} keys (log {data['seq_len']} = "
           f"{data['uniform_entropy']:.2f}).")
    out.append(Figure("entropy", cap, fig3, alt="attention entropy per head"))
    return out
