"""Gradient flow (seed 001's "Gradient Flow Chart"): the L2 norm of every parameter's gradient of the
loss on one batch of evaluation sequences, summed (in quadrature) per layer and per parameter group,
and flagged against two thresholds: vanishing (below `vanishing`, the layer barely learns) and
exploding (above `exploding`, updates may blow up). The probe differentiates the loss once
(`reportgen.probes.lm.gradient_norms`); this module groups the norms and draws them on log axes.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

from reportgen.figures import ACCENT, INK, MUTED, Figure, mpl_figure
from reportgen.stats import metric

NAME = "gradient_flow"
TITLE = "Gradient flow"
SUBJECTS = ("lm",)

COLOURS = {"normal": ACCENT, "vanishing": "#cf222e", "exploding": "#e16f24"}
STATUSES = ("normal", "vanishing", "exploding")
GROUP_ORDER = ("embed", "attn", "mlp", "ln", "other", "unembed")


@dataclass
class Params:
    vanishing: float = 1e-5  # a gradient norm below this is vanishing
    exploding: float = 10.0  # above this, exploding
    batch: int = 8  # sequences in the batch whose loss is differentiated

    def __post_init__(self):
        for k in ("vanishing", "exploding"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{k} must be a finite number, not {v!r}")
            setattr(self, k, float(v))
        if not 0 < self.vanishing < self.exploding:
            raise ValueError(f"thresholds must satisfy 0 < vanishing < exploding, got vanishing={self.vanishing:g}, "
                             f"exploding={self.exploding:g}")
        if isinstance(self.batch, bool) or not isinstance(self.batch, int) or self.batch < 1:
            raise ValueError(f"batch must be an integer of at least 1, not {self.batch!r}")


def needs(params: Params) -> dict:
    return {"gradients": {"batch": params.batch}}


# Module names inside a block, as TransformerLens, Hugging Face models and hand-written PyTorch models spell
# them: the first path component after `blocks.{i}` that matches decides the group.
_ATTN = re.compile(r"(self_)?attn\w*|attention\w*|self_attention|(c_)?qkv\w*|[qkvo]_proj|out_proj|query|key|value|"
                   r"out|c_proj_attn|dense_attn|wq|wk|wv|wo|w_qkv")
_MLP = re.compile(r"mlp\w*|ffn\w*|ff|feed_?forward\w*|fc\d*|c_fc|gate_proj|up_proj|down_proj|w[123]|dense_h_to_4h|"
                  r"dense_4h_to_h|experts?|moe")
_LN = re.compile(r"ln\w*|\w*norm\w*|layer_?norm\w*")


def classify(name: str) -> tuple[str, str, tuple]:
    """(layer, group, sort key) of a parameter name: TransformerLens names (`blocks.3.attn.W_Q`) and the names the
    adapter gives a user's model (`blocks.3.` + the block module's own path, e.g. `blocks.3.qkv.weight`)."""
    m = re.match(r"blocks\.(\d+)\.(.+)", name)
    if m:
        i, parts = int(m.group(1)), m.group(2).split(".")[:-1] or m.group(2).split(".")
        group = "other"
        for part in parts:
            part = part.lower()
            if _LN.fullmatch(part):
                group = "ln"
            elif _ATTN.fullmatch(part):
                group = "attn"
            elif _MLP.fullmatch(part):
                group = "mlp"
            else:
                continue
            break
        return f"block {i}", group, (1, i)
    head = name.split(".")[0]
    if head in ("embed", "pos_embed", "hook_embed"):
        return "embed", "embed", (0, 0)
    if head == "ln_final":
        return "ln_final", "ln", (3, 0)
    if head == "unembed":
        return "unembed", "unembed", (4, 0)
    return head, "other", (2, 0)


def status(norm: float | None, params: Params) -> str:
    """normal, vanishing (< vanishing) or exploding (> exploding, or not finite: stored as None)."""
    if norm is None:
        return "exploding"
    if norm < params.vanishing:
        return "vanishing"
    if norm > params.exploding:
        return "exploding"
    return "normal"


def _combine(norms: list) -> float | None:
    """sqrt of the sum of squares; None when any part is not finite."""
    if any(n is None for n in norms):
        return None
    return math.sqrt(sum(n * n for n in norms))


def compute(trace, params: Params) -> dict:
    if trace.gradients is None:
        raise ValueError("gradient_flow: the trace has no gradients (the probe was not asked for them)")
    rows = []
    for k, (name, norm) in enumerate(trace.gradients):
        layer, group, key = classify(str(name))
        v = float(norm)
        rows.append((key, k, {"name": str(name), "layer": layer, "group": group,
                              "norm": v if math.isfinite(v) else None}))
    rows.sort(key=lambda r: (r[0], r[1]))  # model order: embed, blocks, others, ln_final, unembed
    parameters = [r[2] for r in rows]
    for p in parameters:
        p["status"] = status(p["norm"], params)
    layers: dict[str, list] = {}
    groups: dict[tuple, list] = {}
    for p in parameters:
        layers.setdefault(p["layer"], []).append(p["norm"])
        groups.setdefault((p["layer"], p["group"]), []).append(p["norm"])
    layer_rows = [{"layer": lay, "norm": _combine(ns), "parameters": len(ns)} for lay, ns in layers.items()]
    group_rows = sorted(({"layer": lay, "group": g, "norm": _combine(ns)} for (lay, g), ns in groups.items()),
                        key=lambda r: (list(layers).index(r["layer"]), GROUP_ORDER.index(r["group"])))
    for r in layer_rows + group_rows:
        r["status"] = status(r["norm"], params)
    finite = [p for p in parameters if p["norm"] is not None]
    hi = max(finite, key=lambda p: p["norm"], default=None)
    lo = min(finite, key=lambda p: p["norm"], default=None)
    return {
        "thresholds": {"vanishing": params.vanishing, "exploding": params.exploding},
        "batch": int(params.batch),
        "parameters": parameters,
        "layers": layer_rows,
        "groups": group_rows,
        "counts": {s: sum(p["status"] == s for p in parameters) for s in STATUSES},
        "non_finite": [p["name"] for p in parameters if p["norm"] is None],
        "total_norm": _combine([p["norm"] for p in parameters]),
        "max": {"name": hi["name"], "norm": hi["norm"]} if hi else None,
        "min": {"name": lo["name"], "norm": lo["norm"]} if lo else None,
    }


def metrics(data: dict) -> dict:
    """Norms of one batch's gradient (n: its sequences; one draw, so no interval) and counts of parameters."""
    n, k = data["batch"], len(data["parameters"])
    return {"grad_norm_total": metric(data["total_norm"], n), "grad_norm_max": metric(data["max"]["norm"] if data["max"] else None, n),
            "grad_vanishing": metric(data["counts"]["vanishing"], k), "grad_exploding": metric(data["counts"]["exploding"], k)}


# --- drawing ----------------------------------------------------------------------------------------

def _limits(data: dict) -> tuple[float, float, float]:
    """(bottom, top, floor) of the log axis: both thresholds and every finite positive norm in view;
    zero norms are drawn down to `floor`, non-finite ones up to the top."""
    th = data["thresholds"]
    vals = [p["norm"] for p in data["parameters"] if p["norm"]]
    lo = min([th["vanishing"], *vals])
    hi = max([th["exploding"], *vals])
    bottom, top = lo / 10, hi * 10
    return bottom, top, bottom * 2


def _bars(ax, xs, rows, data, width):
    bottom, top, floor = _limits(data)
    heights = [top if r["norm"] is None else max(r["norm"], floor) for r in rows]
    # bars from 0: on the log axis matplotlib clips them at the bottom, and each patch's height is its norm
    bars = ax.bar(xs, heights, width=width, color=[COLOURS[r["status"]] for r in rows], linewidth=0, zorder=2)
    for b, r in zip(bars, rows):
        if r["norm"] is None:
            b.set_hatch("///")
            b.set_edgecolor("#ffffff")
        elif r["norm"] < floor:
            ax.annotate("0", (b.get_x() + b.get_width() / 2, floor), xytext=(0, 2), textcoords="offset points",
                        ha="center", va="bottom", fontsize=6.5, color=MUTED)
    ax.set_yscale("log")
    ax.set_ylim(bottom, top)
    return bars


def _thresholds(ax, data):
    th = data["thresholds"]
    ax.axhline(th["exploding"], color=COLOURS["exploding"], ls="--", lw=0.9, zorder=3)
    ax.axhline(th["vanishing"], color=COLOURS["vanishing"], ls="--", lw=0.9, zorder=3)


def _legend(ax, data):
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    th = data["thresholds"]
    handles = [Patch(color=COLOURS["normal"], label="normal"), Patch(color=COLOURS["vanishing"], label="vanishing"),
               Patch(color=COLOURS["exploding"], label="exploding"),
               Line2D([], [], color=COLOURS["exploding"], ls="--", lw=0.9, label=f"exploding threshold {th['exploding']:g}"),
               Line2D([], [], color=COLOURS["vanishing"], ls="--", lw=0.9, label=f"vanishing threshold {th['vanishing']:g}")]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0, handlelength=1.6)


def _fmt(v: float | None) -> str:
    return "not finite" if v is None else f"{v:.3g}"


def _short(layer: str) -> str:
    return layer.replace("block ", "") if layer.startswith("block ") else layer


def figures(data: dict, params: Params) -> list[Figure]:
    th = data["thresholds"]
    layers = data["layers"]
    n = len(layers)
    fig, ax = mpl_figure(1, 1, (6.6, 2.8))
    a = ax[0][0]
    fig.subplots_adjust(left=0.7 / 6.6, right=1 - 1.85 / 6.6, bottom=0.72 / 2.8)
    _bars(a, range(n), layers, data, 0.7)
    _thresholds(a, data)
    a.set_xticks(range(n), [r["layer"] if n <= 16 else _short(r["layer"]) for r in layers],
                 rotation=35 if n > 4 else 0, ha="right" if n > 4 else "center", rotation_mode="anchor")
    a.set_xlim(-0.6, n - 0.4)
    a.set(ylabel="gradient L2 norm", title=f"Gradient norm per layer (loss on {data['batch']} sequences)")
    a.grid(axis="x", visible=False)
    _legend(a, data)
    mx, mn = data["max"], data["min"]
    extremes = (f" The largest parameter gradient is {mx['name']} ({_fmt(mx['norm'])}), the smallest {mn['name']} "
                f"({_fmt(mn['norm'])})." if mx else "")
    c = data["counts"]
    nf = data["non_finite"]
    f1 = Figure("layers", (
        f"Gradient flow: L2 norm of the loss gradient on {data['batch']} evaluation sequences, per layer (the square "
        f"root of the sum of squared norms of the layer's parameters), on a log axis. Blue bars are normal, red "
        f"vanishing (below {th['vanishing']:g}, dashed red line), orange exploding (above {th['exploding']:g}, "
        f"dashed orange line). Of {sum(c.values())} parameters, {c['vanishing']} vanish and {c['exploding']} explode."
        + extremes + (f" Hatched bars are not finite ({', '.join(nf[:4])}{', …' if len(nf) > 4 else ''})." if nf else "")
        + " A healthy model shows bars between the lines, with no layer orders of magnitude below its neighbours."),
        fig, alt="Bar chart of gradient norm per layer on a log scale with two threshold lines")

    groups = data["groups"]
    xs, centres, seps = [], [], []
    x, prev = 0.0, None
    for g in groups:
        if prev is not None and g["layer"] != prev:
            seps.append(x - 0.2)
            x += 0.4  # gap between layers
        xs.append(x)
        prev = g["layer"]
        x += 1
    for lay in dict.fromkeys(g["layer"] for g in groups):
        pos = [xx for xx, g in zip(xs, groups) if g["layer"] == lay]
        centres.append((sum(pos) / len(pos), lay))
    fig, ax = mpl_figure(1, 1, (6.6, 2.9))
    fig.subplots_adjust(left=0.7 / 6.6, right=1 - 1.85 / 6.6, bottom=0.8 / 2.9)
    b = ax[0][0]
    _bars(b, xs, groups, data, 0.8)
    _thresholds(b, data)
    # a block's bars are labelled by group, with the block under them; a one-group layer by its own name
    b.set_xticks(xs, [g["group"] if g["layer"].startswith("block ") else g["layer"] for g in groups], rotation=90,
                 fontsize=6.5)
    b.tick_params(axis="x", length=0, pad=2)
    b.set_xlim(-0.7, xs[-1] + 0.7 if xs else 0.7)
    for s in seps:
        b.axvline(s, color="#d0d7de", lw=0.6, zorder=1)
    import matplotlib.transforms as mtrans

    tr = mtrans.blended_transform_factory(b.transData, b.transAxes)
    blocks = sum(lay.startswith("block ") for _, lay in centres)
    for cx, lay in centres:
        if lay.startswith("block "):
            b.text(cx, -0.25, lay if blocks <= 6 else _short(lay), transform=tr, ha="center", va="top", fontsize=7,
                   color=INK)
    if blocks > 6:
        b.text(-0.01, -0.25, "block", transform=b.transAxes, ha="right", va="top", fontsize=7, color=MUTED)
    b.set(ylabel="gradient L2 norm", title="Gradient norm per parameter group")
    b.grid(axis="x", visible=False)
    _legend(b, data)
    f2 = Figure("groups", (
        "Gradient norm per parameter group: within each block, attention (attn: the query, key, value and output "
        "weights and biases), MLP (mlp: its input, gate and output weights and biases), the block's norms (ln) and "
        "any other parameter (other); embed is the token (and position) "
        "embedding, ln_final the final layer norm, unembed the unembedding. Same colours and thresholds as the "
        "previous figure; a group's norm is the square root of the sum of its parameters' squared norms."),
        fig, alt="Bar chart of gradient norm per parameter group and layer on a log scale")
    return [f1, f2]
