"""Attention: heatmaps per layer (mean over heads) and per head for one sequence with its tokens as
labels, and attention entropy per layer and head over every query position of every sequence:
mean, std, min, max, with seed 001's reading (focused < 1.0 nats, diffuse > 2.0 nats).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from reportgen.errors import ReportgenError
from reportgen.figures import Figure, mpl_figure
from reportgen.text import show_token, symbol_key
from reportgen.stats import bootstrap_mean

NAME = "attention"
METRICS = {"attention_entropy": ("attn. entropy", "num")}
PATTERN = "attn.hook_pattern"  # the hook point whose activations this analysis reads, reduced to entropy
TITLE = "Attention patterns and entropy"
SUBJECTS = ("lm",)
LOG_FLOOR = 1e-3  # bottom of the shared log colour scale
EMPTY = "∅"  # label of an empty token string
SCALES = ("log", "panel")


def parse_selection(v, what: str) -> list[int] | None:
    """'all' -> None; '0,2-3' (or a TOML list / int) -> [0, 2, 3]."""
    if isinstance(v, int) and not isinstance(v, bool):
        v = [v]
    if isinstance(v, list):
        items = [str(x) for x in v]
    elif isinstance(v, str):
        if v.strip().lower() == "all":
            return None
        items = [x.strip() for x in v.split(",") if x.strip()]
    else:
        raise ValueError(f"{what} must be 'all' or a list like 0,2-3")
    out = []
    for x in items:
        a, dash, b = x.partition("-")
        if not (a.isdigit() and (not dash or b.isdigit())):
            raise ValueError(f"{what} must be 'all' or a list like 0,2-3, not {v!r}")
        out += list(range(int(a), int(b) + 1)) if dash else [int(a)]
    if not out:
        raise ValueError(f"{what} selects nothing")
    return sorted(set(out))


def pick(v, count: int, what: str) -> list[int]:
    """The selected indices among 0..count-1 (all when 'all'); one clear error for one that does not exist."""
    sel = parse_selection(v, what)
    if sel is None:
        return list(range(count))
    bad = [i for i in sel if i >= count]
    if bad:
        raise ReportgenError(f"--param attention.{what}: {bad[0]} does not exist (the model has 0..{count - 1})")
    return sel


@dataclass
class Params:
    sample: int = 0  # sequence whose patterns are drawn
    max_tokens: int = 32  # positions shown in the heatmaps, each labelled (the entropy uses all)
    focused: float = 1.0  # entropy below this (nats): focused attention
    diffuse: float = 2.0  # entropy above this: diffuse attention
    heads: bool = True  # also draw the heads as small multiples
    layers: str = "all"  # layers drawn, e.g. "0,2-3" (the entropy covers all)
    head_ids: str = "all"  # heads drawn in the head grid, e.g. "0-3"
    scale: str = "log"  # colour scale: "log" shared by every panel, or "panel" (each panel linear to its own max)

    def __post_init__(self):
        parse_selection(self.layers, "layers")
        parse_selection(self.head_ids, "head_ids")
        if self.scale not in SCALES:
            raise ValueError(f"scale must be one of {', '.join(SCALES)}, not {self.scale!r}")
        if self.sample < 0 or self.max_tokens < 2:
            raise ValueError("sample must be >= 0 and max_tokens >= 2")
        if not 0 <= self.focused < self.diffuse:
            raise ValueError("need 0 <= focused < diffuse")


def needs(params: Params) -> dict:
    return {"activations": {PATTERN: {"reduce": "entropy", "sample": params.sample, "window": params.max_tokens}}}


def reading(e: float, p: Params) -> str:
    return "focused" if e < p.focused else "diffuse" if e > p.diffuse else "normal"


def compute(trace, params: Params) -> dict:
    a = trace.activations.get(PATTERN) if hasattr(trace, "activations") else None
    if a is None:
        raise ValueError("attention: the trace has no attention patterns (the probe was not asked for them)")
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


TOKEN_PITCH = 0.08  # inches per token row/column in the layer heatmaps: room for a 6 pt label each
LABEL_PT = 6.0
PAGE_W, PAGE_H = 6.9, 8.6  # inches a figure may take on an A4 page (text width 7 in) beside its caption
BAR_W, BAR_GAP = 0.1, 0.08  # colour bar width and its gap from the panel(s), inches


def _norm(scale: str, peak: float):
    from matplotlib.colors import LogNorm, Normalize

    return LogNorm(vmin=LOG_FLOOR, vmax=1.0) if scale == "log" else Normalize(vmin=0.0, vmax=max(peak, 1e-6))


def _image(ax, pattern, scale: str, causal: bool):
    """One attention heatmap; the causally masked upper triangle is grey, not 'no weight'."""
    import matplotlib

    a = np.asarray(pattern, dtype=float)
    if scale == "log":
        a = np.maximum(a, LOG_FLOOR)  # weights rounded to 0 sit at the bottom of the scale
    if causal:
        a = np.ma.masked_where(np.triu(np.ones(a.shape, bool), 1), a)
    cmap = matplotlib.colormaps["Blues"].with_extremes(bad="#d0d7de")
    ax.grid(False)
    return ax.imshow(a, cmap=cmap, norm=_norm(scale, float(a.max())), interpolation="nearest", aspect="auto")


def _bar(fig, im, x: float, y: float, h: float, W: float, H: float, label: str | None, size: float = 6):
    """A colour bar at (x, y) inches from the figure's bottom left, h inches tall."""
    cax = fig.add_axes((x / W, y / H, BAR_W / W, h / H), label="colour bar")
    cb = fig.colorbar(im, cax=cax)
    cax.grid(False)
    cax.tick_params(labelsize=size, length=2, pad=1)
    if label:
        cb.set_label(label, fontsize=7)
    return cb


def _chunks(items: list, size: int) -> list[list]:
    """items in as few groups of at most `size` as possible, the groups as even as possible."""
    k = -(-len(items) // size)
    per = -(-len(items) // k)
    return [items[i:i + per] for i in range(0, len(items), per)]


def _symbol_note(tokens: list[str]) -> str:
    key = symbol_key(tokens, empty=EMPTY)
    return f" Token symbols: {key}." if key else ""


def _scale_note(scale: str, causal: bool) -> str:
    s = (f"Colour: one log scale shared by every panel, from {LOG_FLOOR:g} (and below) to 1, so a near-uniform layer "
         f"still shows its pattern" if scale == "log" else
         "Colour: each panel's own linear scale from 0 to its largest weight (see its colour bar)")
    return s + ("; grey: hidden by the causal mask." if causal else ".")


def layer_figures(data: dict, params: Params) -> list[Figure]:
    """Per layer, the mean over heads, every shown token named on both axes; as many figures as the layers need,
    each a grid of panels that fits a page."""
    layers = pick(params.layers, len(data["pattern_mean_over_heads"]), "layers")
    labels = [show_token(t) or EMPTY for t in data["tokens"]]
    n = len(labels)
    side = max(1.2, n * TOKEN_PITCH)
    longest = max(len(t) for t in labels)
    rotate = longest > 2
    lab = 0.05 + 0.045 * longest  # inches a tick label takes (6 pt: ~0.045 in per character)
    xlab = (lab if rotate else 0.1) + 0.17  # x tick labels + the axis title under a panel
    ml = lab + 0.22  # y tick labels + axis title, first column only (every panel has the same tokens)
    own = params.scale != "log"  # a colour bar per panel
    gx = BAR_GAP + BAR_W + 0.35 + 0.1 if own else 0.15
    mr = (BAR_GAP + BAR_W + 0.4) if own else 0.85
    gap = xlab + 0.3  # between rows: the x labels of one and the title of the next
    cols = max(1, min(len(layers), int((PAGE_W - ml - mr + gx) // (side + gx))))
    rows_per_fig = max(1, int((PAGE_H - 0.3 - xlab + gap) // (side + gap)))
    out = []
    groups = _chunks(layers, cols * rows_per_fig)
    for gi, group in enumerate(groups, 1):
        rows = -(-len(group) // cols)
        c_used = min(cols, len(group))
        W = ml + c_used * side + (c_used - 1) * gx + mr
        H = 0.28 + rows * side + (rows - 1) * gap + xlab + 0.05
        fig, axes = mpl_figure(rows, c_used, size=(W, H))
        im = None
        for k in range(rows * c_used):
            r, c = divmod(k, c_used)
            ax = axes[r][c]
            x0, y0 = ml + c * (side + gx), H - 0.28 - side - r * (side + gap)
            ax.set_position((x0 / W, y0 / H, side / W, side / H))
            if k >= len(group):
                ax.axis("off")
                continue
            li = group[k]
            im = _image(ax, data["pattern_mean_over_heads"][li], params.scale, data["causal"])
            ax.set_title(f"layer {li}", fontsize=8, pad=3)
            ax.set_xticks(range(n))
            ax.set_xticklabels(labels, fontsize=LABEL_PT, rotation=90 if rotate else 0)
            ax.set_yticks(range(n))
            ax.set_yticklabels(labels if c == 0 else [], fontsize=LABEL_PT)
            ax.tick_params(length=0, pad=1.5)
            ax.set_xlabel("key (attended-to token)", fontsize=7, labelpad=2)
            if c == 0:
                ax.set_ylabel("query token", fontsize=7, labelpad=2)
            if own:
                _bar(fig, im, x0 + side + BAR_GAP, y0, side, W, H, None)
        if not own:
            h = min(side * rows + gap * (rows - 1), 3.0)
            _bar(fig, im, W - mr + 0.15, H - 0.28 - h, h, W, H, "attention weight (log scale)")
        part = f" (part {gi} of {len(groups)}: layers {', '.join(map(str, group))})" if len(groups) > 1 else ""
        cap = (f"Attention of sequence {data['sample']} (first {n} of {data['seq_len']} positions), mean over heads, "
               f"per layer{part}. Row: the query token; column: the key token it attends to; darker = more weight. "
               f"{_scale_note(params.scale, data['causal'])}{_symbol_note(data['tokens'])}")
        out.append(Figure(f"layers-{gi}", cap, fig, alt=f"attention heatmaps of layers {', '.join(map(str, group))}"))
    return out


def head_figures(data: dict, params: Params) -> list[Figure]:
    """The selected heads of the selected layers as small multiples (a row per layer) with a colour bar, each
    head's mean entropy in its title; as many figures as the layers need."""
    L, H = len(data["pattern_heads"]), len(data["pattern_heads"][0])
    layers = pick(params.layers, L, "layers")
    heads = pick(params.head_ids, H, "head_ids")
    ent = {(h["layer"], h["head"]): h for h in data["entropy"]["heads"]}
    n = len(data["tokens"])
    own = params.scale != "log"
    ml, mr, title = 0.45, (BAR_GAP + BAR_W + 0.35 if own else 0.85), 0.22
    gx = (BAR_GAP + BAR_W + 0.3) if own else 0.08
    cell = min(1.45, (PAGE_W - ml - mr + gx) / len(heads) - gx)
    gap = title + 0.05
    rows_per_fig = max(1, int((PAGE_H - 0.3 + gap) // (cell + gap)))
    out = []
    groups = _chunks(layers, rows_per_fig)
    for gi, group in enumerate(groups, 1):
        W = ml + len(heads) * cell + (len(heads) - 1) * gx + mr
        Hh = title + len(group) * cell + (len(group) - 1) * gap + 0.2
        fig, axs = mpl_figure(len(group), len(heads), size=(W, Hh))
        im = None
        for r, li in enumerate(group):
            for c, h in enumerate(heads):
                ax = axs[r][c]
                x0, y0 = ml + c * (cell + gx), Hh - title - cell - r * (cell + gap)
                ax.set_position((x0 / W, y0 / Hh, cell / W, cell / Hh))
                im = _image(ax, data["pattern_heads"][li][h], params.scale, data["causal"])
                ax.set_xticks([])
                ax.set_yticks([])
                ax.set_title(f"H{h} · {ent[(li, h)]['mean']:.2f}" + (" nats" if cell + gx > 0.95 else ""), fontsize=6.5,
                             pad=2)
                if c == 0:
                    ax.set_ylabel(f"layer {li}\nquery ↓", fontsize=6.5, labelpad=2)
                if r == len(group) - 1:
                    ax.set_xlabel("key →", fontsize=6.5, labelpad=2)
                if own:
                    _bar(fig, im, x0 + cell + BAR_GAP, y0, cell, W, Hh, None, size=5.5)
        if not own:
            h = min(Hh - title - 0.2, 3.0)
            _bar(fig, im, W - mr + 0.15, Hh - title - h, h, W, Hh, "attention weight (log scale)")
        part = f" (part {gi} of {len(groups)}: layers {', '.join(map(str, group))})" if len(groups) > 1 else ""
        shown = "every head" if len(heads) == H else f"heads {', '.join(map(str, heads))}"
        cap = (f"Attention of {shown} on the same {n} positions of sequence {data['sample']}{part}: a row per layer, "
               f"a panel per head, query down, key across. Panel title: the head and its mean attention entropy (nats) "
               f"over all sequences. {_scale_note(params.scale, data['causal'])}")
        out.append(Figure(f"heads-{gi}", cap, fig, alt="attention heatmaps per head"))
    return out


def figures(data: dict, params: Params) -> list[Figure]:
    out = layer_figures(data, params)
    if data["draw_heads"]:
        out += head_figures(data, params)
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
    ax.set_xticklabels([f"L{h['layer']}H{h['head']}" for h in ent], fontsize=6, rotation=90)
    ax.set_ylabel("entropy (nats)")
    cap = (f"Attention entropy per head over {data['query_rows']:,} query positions: bar = mean, whisker = min to max. "
           f"Green: focused (mean < {data['thresholds']['focused']}), orange: diffuse (> {data['thresholds']['diffuse']}), "
           f"blue: between. Dotted: a uniform row over {data['seq_len']} keys (log {data['seq_len']} = "
           f"{data['uniform_entropy']:.2f}).")
    out.append(Figure("entropy", cap, fig3, alt="attention entropy per head"))
    return out
