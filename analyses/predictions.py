"""Prediction table (seed 001's MLM table): per scored position of the first sequences — sample,
position, original token, what the model saw, its top-k predictions with probabilities, ✓/✗ — and
the loss (bootstrap interval over the scored positions) and top-1 accuracy (Wilson interval) over every
scored position of every evaluation sequence (--eval); the table and the histogram show the first ones. For a
restoration (masked) model the scored positions are the masked ones; for a causal model, every
position predicts the next token.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from reportgen.figures import BAD, GOOD, Figure, mpl_figure
from reportgen.stats import bootstrap_mean, proportion

NAME = "predictions"
METRICS = {"masked_accuracy": ("masked acc.", "pct"), "next_token_accuracy": ("next-token acc.", "pct")}
TITLE = "Predictions"
SUBJECTS = ("lm",)


@dataclass
class Params:
    top_k: int = 5
    max_rows: int = 30  # table rows (spread over the first sequences)
    context: int = 10  # tokens of context shown on each side

    def __post_init__(self):
        if not 1 <= self.top_k <= 20 or self.max_rows < 1 or self.context < 0:
            raise ValueError("need 1 <= top_k <= 20, max_rows >= 1, context >= 0")


def needs(params: Params) -> dict:
    return {"logits": {"top_k": params.top_k}}


def compute(trace, params: Params) -> dict:
    ids, probs = trace.arrays["top_ids"], trace.arrays["top_probs"]  # [S,T,k]
    S, T, k = ids.shape
    k = min(k, params.top_k)
    voc = trace.vocab
    cand = [(s, t) for s in range(S) for t in range(T) if trace.scored[s, t]]
    per_sample = max(1, -(-params.max_rows // max(S, 1)))
    picked, counts = [], {}
    for s, t in cand:  # the first positions of each sequence, so every sample is in the table
        if counts.get(s, 0) < per_sample and len(picked) < params.max_rows:
            picked.append((s, t))
            counts[s] = counts.get(s, 0) + 1
    rows = []
    for s, t in picked:
        lo, hi = max(0, t - params.context), min(T, t + params.context + 1)
        if trace.causal:
            hi = t + 1
        rows.append({
            "sample": s, "position": t, "original": voc[int(trace.targets[s, t])], "masked": voc[int(trace.inputs[s, t])],
            "left": [voc[int(x)] for x in trace.inputs[s, lo:t]], "right": [voc[int(x)] for x in trace.inputs[s, t + 1:hi]],
            "top": [{"token": voc[int(i)], "id": int(i), "p": round(float(p), 4)} for i, p in zip(ids[s, t, :k], probs[s, t, :k])],
            "correct": bool(ids[s, t, 0] == trace.targets[s, t]),
        })
    sc = trace.scored[:S]
    top1 = ids[:, :, 0][sc]
    tgt = trace.targets[:S][sc]
    p1 = probs[:, :, 0][sc]
    hit = top1 == tgt
    in_topk = (ids[:, :, :k][sc] == tgt[:, None]).any(-1)
    m = trace.metrics
    return {
        "task": "next-token" if trace.causal else "masked",
        # over every scored position of the evaluation sequences; n = positions
        "loss": bootstrap_mean(trace.token_loss), "accuracy": proportion(m["hits"], m["n_scored"]),
        "scored": m["n_scored"], "sequences": m["n_seqs"], "eval_cap": m.get("eval_cap"),
        "seq_len": m["seq_len"], "top_k": k, "rows": rows, "shown_sequences": int(S),
        "sample_positions": int(hit.size), "sample_accuracy": proportion(hit.sum(), hit.size),
        "sample_topk_accuracy": proportion(in_topk.sum(), hit.size),
        "top1_prob_correct": [round(float(x), 4) for x in p1[hit]],
        "top1_prob_wrong": [round(float(x), 4) for x in p1[~hit]],
    }


def metrics(data: dict) -> dict:
    key = "next_token_accuracy" if data["task"] == "next-token" else "masked_accuracy"
    return {"loss": data["loss"], key: data["accuracy"]}


def figures(data: dict, params: Params) -> list[Figure]:
    good, bad = np.asarray(data["top1_prob_correct"]), np.asarray(data["top1_prob_wrong"])
    if good.size + bad.size == 0:
        return []
    fig, axes = mpl_figure(1, 1, size=(6.4, 2.3))
    ax = axes[0][0]
    bins = np.linspace(0, 1, 21)
    ax.hist([good, bad], bins=bins, color=[GOOD, BAD], label=[f"top-1 right ({good.size})", f"top-1 wrong ({bad.size})"],
            stacked=True)
    ax.set_xlabel("probability of the top-1 prediction")
    ax.set_ylabel("positions")
    ax.legend(frameon=False, fontsize=7)
    what = "masked" if data["task"] == "masked" else "predicted"
    cap = (f"Confidence of the top-1 prediction at the {data['sample_positions']} {what} positions of the first "
           f"{data['shown_sequences']} sequences, split by whether it is right. A calibrated model is right about as "
           f"often as it is confident.")
    return [Figure("confidence", cap, fig, alt="histogram of top-1 probabilities")]
