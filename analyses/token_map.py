"""Token map of embedding space (seed 002): a regular 2-D grid of points is lifted into the model's
residual stream (x, y in the first two dimensions, repeated over all dimension pairs, or through a
fixed random projection), fed in at one layer as one-token sequences, and each point is labelled
with the model's most probable output token there (the next token for a causal LM, the token it restores
for a masked LM) and its probability. Regions of one token show how the
model partitions that 2-D slice; the shading shows how sure it is. This module makes the grid's
vectors; the probe runs them from the layer (its `run_from_layer` need); this module exports the result as the seed's JSON and draws it on a Canvas
(one rectangle and one label per cell: a 50×50 map in milliseconds, not seconds of matplotlib text).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from reportgen.figures import INK, MUTED, PNG_SCALE, Canvas, Figure, mix
from reportgen.text import show_token
from reportgen.stats import metric

NAME = "token_map"
TITLE = "Token map of embedding space"
SUBJECTS = ("lm",)

METHODS = ("direct", "replicated", "random_projection")
METHOD_TEXT = {
    "direct": "x and y in the first two dimensions, zeros elsewhere",
    "replicated": "(x, y) repeated across every pair of dimensions",
    "random_projection": "a fixed random projection of (x, y) to the full width (seed {seed})",
}


def _int(name: str, v, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer, float, str)):
        raise ValueError(f"{name} must be an integer, not {v!r}")
    try:
        f = float(v)
    except ValueError:
        raise ValueError(f"{name} must be an integer, not {v!r}") from None
    if not math.isfinite(f) or f != int(f):
        raise ValueError(f"{name} must be an integer, not {v!r}")
    if int(f) < lo:
        raise ValueError(f"{name} must be at least {lo}, not {int(f)}")
    return int(f)


def _float(name: str, v) -> float:
    if isinstance(v, bool):
        raise ValueError(f"{name} must be a number, not {v!r}")
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, not {v!r}") from None
    if not math.isfinite(f):
        raise ValueError(f"{name} must be finite, not {v!r}")
    return f


@dataclass
class Params:
    grid_size: int = 50  # G: the map has G×G points
    spacing: float = 0.5  # distance between neighbouring points
    center: tuple = (0.0, 0.0)  # (x, y) of the grid's centre; a list, or "x,y" from --param
    layer: int = -1  # block the vectors enter before; -1 = the last block, n_layers = straight to the unembedding
    method: str = "random_projection"  # direct | replicated | random_projection
    seed: int = 0  # of the random projection
    batch_size: int = 100  # grid points per forward pass

    def __post_init__(self):
        self.grid_size = _int("grid_size", self.grid_size, 1)
        self.spacing = _float("spacing", self.spacing)
        if self.spacing <= 0:
            raise ValueError(f"spacing must be positive, not {self.spacing!r}")
        c = self.center
        if isinstance(c, str):
            c = [p for p in c.strip().strip("[]()").replace(",", " ").split() if p]
        if not isinstance(c, (list, tuple, np.ndarray)) or len(c) != 2:
            raise ValueError(f"center must be two numbers [x, y], not {self.center!r}")
        self.center = [_float("center", v) for v in c]
        self.layer = _int("layer", self.layer, -1)
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, not {self.method!r}")
        self.seed = _int("seed", self.seed, 0)
        self.batch_size = _int("batch_size", self.batch_size, 1)


def resolve_layer(layer: int, n_layers: int) -> int:
    """The block index the grid vectors enter before: -1 is the last block; n_layers skips every block."""
    r = n_layers - 1 if layer == -1 else layer
    if not 0 <= r <= n_layers:
        raise ValueError(f"token_map layer {layer} is out of range for a model with {n_layers} layers "
                         f"(use -1 for the last block, 0..{n_layers})")
    return r


def needs(params: Params) -> dict:
    """What the probe computes for this analysis: the grid's vectors run from `layer` (-1: the last block;
    the build resolves it against the model)."""
    spec = {"grid_size": params.grid_size, "spacing": params.spacing, "center": list(params.center),
            "method": params.method, "seed": params.seed}
    return {"run_from_layer": {"layer": params.layer, "count": params.grid_size ** 2, "batch_size": params.batch_size,
                               "vectors": GridVectors(spec), "bytes_per_vector": 76,
                               "fit_hint": lambda n: f"at most grid_size {int(n ** 0.5)} fits"}}


class GridVectors:
    """The grid's points lifted into the residual stream: `(rows, d_model) -> [len(rows), d_model]` tensor."""

    def __init__(self, spec: dict):
        self.spec = dict(spec)

    def __eq__(self, other):
        return isinstance(other, GridVectors) and other.spec == self.spec

    def __call__(self, rows: slice, d_model: int):
        return grid_vectors(self.spec, d_model, rows)[1]


def grid_coords(spec: dict) -> np.ndarray:
    """[G*G, 2] float32 coordinates of the grid, row-major, row 0 at the top (largest y)."""
    G, s = int(spec["grid_size"]), float(spec["spacing"])
    cx, cy = (float(c) for c in spec.get("center", (0.0, 0.0)))
    axis = (np.arange(G) - (G - 1) / 2) * s
    xs, ys = np.meshgrid(cx + axis, cy - axis)
    return np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.float32)


def grid_vectors(spec: dict, d_model: int, rows: slice | None = None):
    """The grid's coordinates [n, 2] and their d_model-dimensional vectors (torch) for `rows` of the grid."""
    import torch

    coords = grid_coords(spec)
    if rows is not None:
        coords = coords[rows]
    c = torch.from_numpy(coords)
    method = spec["method"]
    if method == "direct":
        v = torch.zeros(len(c), d_model)
        v[:, :2] = c
    elif method == "replicated":
        v = c.repeat(1, (d_model + 1) // 2)[:, :d_model]
    elif method == "random_projection":
        g = torch.Generator().manual_seed(int(spec.get("seed", 0)))
        R = torch.randn(2, d_model, generator=g) / np.sqrt(d_model)  # E|cR|^2 = |c|^2: distances kept on average
        v = c @ R
    else:
        raise ValueError(f"unknown embedding method {method!r}")
    return coords, v


def _token(vocab, t: int) -> str:
    return vocab[t] if 0 <= t < len(vocab) else f"<{t}>"


def compute(trace, params: Params) -> dict:
    rf = getattr(trace, "run_from", None)
    if rf is None:
        raise ValueError("token_map: the trace has no vectors run from a layer (the probe was not asked for them)")
    spec = {**rf.get("vectors", {}), "layer": rf["layer"], "batch_size": rf.get("batch_size", params.batch_size)}
    G = int(round(np.asarray(rf["ids"]).size ** 0.5))
    ids = np.asarray(rf["ids"]).astype(np.int64).reshape(G, -1)
    probs = np.asarray(rf["probs"], dtype=np.float64).reshape(G, -1)
    coords = grid_coords({"grid_size": G, "spacing": spec.get("spacing", params.spacing),
                          "center": spec.get("center", params.center)}).astype(np.float64)
    if ids.shape != (G, G) or probs.shape != (G, G) or coords.shape != (G * G, 2):
        raise ValueError(f"token_map: expected ids and probs [G,G] and coords [G*G,2], got {ids.shape}, "
                         f"{probs.shape}, {coords.shape}")

    def cfg(k):
        return spec[k] if k in spec else getattr(params, k)

    config = {"grid_size": int(G), "spacing": float(cfg("spacing")), "center": [float(v) for v in cfg("center")],
              "layer": int(cfg("layer")), "method": str(cfg("method")), "seed": int(cfg("seed")),
              "batch_size": int(cfg("batch_size"))}
    vocab = trace.vocab
    strings = {int(t): _token(vocab, int(t)) for t in np.unique(ids)}
    flat = ids.ravel()
    uniq, counts = np.unique(flat, return_counts=True)
    order = sorted(range(len(uniq)), key=lambda i: (-counts[i], uniq[i]))[:10]
    top = []
    for i in order:
        t = int(uniq[i])
        top.append({"id": t, "token": strings[t], "shown": show_token(strings[t]), "cells": int(counts[i]),
                    "share": round(float(counts[i]) / flat.size, 6),
                    "mean_probability": round(float(probs[ids == t].mean()), 6)})
    return {
        "config": config,
        "n_layers": int(trace.n_layers),
        "task": "next-token" if getattr(trace, "causal", True) else "masked",
        "coordinates": np.round(coords, 6).tolist(),
        "token_ids": ids.tolist(),
        "probabilities": np.round(probs, 6).tolist(),
        "token_strings": [[strings[t] for t in row] for row in ids.tolist()],
        "distinct_tokens": int(len(uniq)),
        "mean_probability": round(float(probs.mean()), 6),
        "top_tokens": top,
    }


def metrics(data: dict) -> dict:
    """Distinct top tokens over the map's cells (n: the cells; a count of the whole grid, no interval)."""
    return {"token_map_distinct": metric(data["distinct_tokens"], data["config"]["grid_size"] ** 2)}


# --- drawing ----------------------------------------------------------------------------------------

# light to dark: darker = higher top-token probability (a blue ramp, perceptually ordered)
RAMP = ("#f7fbff", "#c6dbef", "#6baed6", "#2171b5", "#08306b")
LEVELS = 256
TEXT_MIN_CELL = 9.0  # px: smaller cells are drawn without their token
BOUNDARY = "#ffffff"


def ramp_colour(p: float) -> str:
    """Colour of probability p on RAMP (linear interpolation between the stops)."""
    p = min(1.0, max(0.0, float(p)))
    k = min(len(RAMP) - 2, int(p * (len(RAMP) - 1)))
    return mix(RAMP[k], RAMP[k + 1], p * (len(RAMP) - 1) - k)


def _luminance(c: str) -> float:
    r, g, b = (int(c[i:i + 2], 16) / 255 for i in (1, 3, 5))
    lin = [v / 12.92 if v <= 0.04045 else ((v + 0.055) / 1.055) ** 2.4 for v in (r, g, b)]
    return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]


_LUT = [ramp_colour(i / (LEVELS - 1)) for i in range(LEVELS)]
_INK_ON = ["#ffffff" if _luminance(c) < 0.3 else INK for c in _LUT]


def cell_label(s: str) -> str:
    """A token as shown in a cell: whitespace made visible, at most 3 characters."""
    v = show_token(s)
    if not v:
        return "∅"
    if len(v) == 4 and v.startswith("\\x"):
        return v[1:]  # x0b
    return v if len(v) <= 3 else v[:2] + "…"


def layout(G: int) -> dict:
    """Geometry of the map: grid origin, cell size (a whole number of PNG pixels) and colour bar."""
    cell = round(560 / G * PNG_SCALE) / PNG_SCALE
    if G * cell > 570:
        cell = math.floor(560 / G * PNG_SCALE) / PNG_SCALE
    if cell < 4:  # at least 4 px while the map stays within 570 px (the page's width)
        cell = min(4.0, 570 / G)
    x0, y0 = 56.0, 24.0
    side = G * cell
    return {"cell": cell, "x0": x0, "y0": y0, "side": side, "bar_x": x0 + side + 22, "bar_w": 12.0,
            "text": cell >= TEXT_MIN_CELL}


def _nice_step(span: float, target: int = 6) -> float:
    raw = span / target if span > 0 else 1.0
    e = 10 ** math.floor(math.log10(raw))
    return next(m * e for m in (1, 2, 2.5, 5, 10) if m * e >= raw * 0.999)


def _ticks(lo: float, hi: float) -> list[float]:
    step = _nice_step(hi - lo)
    k0, k1 = math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9)
    return [round(k * step, 10) + 0.0 for k in range(k0, k1 + 1)]


def _fmt(v: float) -> str:
    s = f"{v:.6g}"
    return "0" if s in ("-0", "0") else s.replace("-", "−")


def draw_map(data: dict) -> Canvas:
    cfg = data["config"]
    ids, probs, strings = data["token_ids"], data["probabilities"], data["token_strings"]
    G, s = cfg["grid_size"], cfg["spacing"]
    cx, cy = cfg["center"]
    L = layout(G)
    cell, x0, y0, side = L["cell"], L["x0"], L["y0"], L["side"]
    bx, bw = L["bar_x"], L["bar_w"]
    c = Canvas(bx + bw + 58, y0 + side + 40)
    fs = min(cell * 0.62, 16.0)
    labels = {}
    # cells: fill by probability, token centred
    for i in range(G):
        y = y0 + i * cell
        row_p, row_s = probs[i], strings[i]
        for j in range(G):
            q = min(LEVELS - 1, max(0, int(row_p[j] * (LEVELS - 1) + 0.5)))
            c.rect(x0 + j * cell, y, cell + 0.02, cell + 0.02, fill=_LUT[q])  # overlap: no seams in the PNG
        if L["text"]:
            for j in range(G):
                q = min(LEVELS - 1, max(0, int(row_p[j] * (LEVELS - 1) + 0.5)))
                t = row_s[j]
                lab = labels.get(t)
                if lab is None:
                    lab = labels[t] = cell_label(t)
                size = fs if len(lab) == 1 else fs * (0.8 if len(lab) == 2 else 0.6)
                c.text(x0 + (j + 0.5) * cell, y + cell / 2, lab, size=round(size, 2), fill=_INK_ON[q])
    # boundaries between regions of different top tokens (merged runs of cell edges)
    bwid = 0.9 if cell >= TEXT_MIN_CELL else 0.6
    for j in range(1, G):  # vertical edges between columns j-1 and j, merged down the rows
        run = None
        for i in range(G + 1):
            edge = i < G and ids[i][j] != ids[i][j - 1]
            if edge and run is None:
                run = i
            elif not edge and run is not None:
                c.line(x0 + j * cell, y0 + run * cell, x0 + j * cell, y0 + i * cell, stroke=BOUNDARY, width=bwid)
                run = None
    for i in range(1, G):
        run = None
        a, b = ids[i - 1], ids[i]
        for j in range(G + 1):
            edge = j < G and a[j] != b[j]
            if edge and run is None:
                run = j
            elif not edge and run is not None:
                c.line(x0 + run * cell, y0 + i * cell, x0 + j * cell, y0 + i * cell, stroke=BOUNDARY, width=bwid)
                run = None
    c.rect(x0, y0, side, side, stroke=MUTED, width=0.8)
    # axes: nice coordinate values at their positions (cell centres are the grid points)
    half = (G - 1) / 2 * s
    for v in _ticks(cx - half, cx + half):
        x = x0 + (0.5 + (v - (cx - half)) / s) * cell
        c.line(x, y0 + side, x, y0 + side + 4, stroke=INK, width=0.8)
        c.text(x, y0 + side + 12, _fmt(v), size=9)
    for v in _ticks(cy - half, cy + half):
        y = y0 + (0.5 + ((cy + half) - v) / s) * cell
        c.line(x0 - 4, y, x0, y, stroke=INK, width=0.8)
        c.text(x0 - 6, y, _fmt(v), size=9, anchor="end")
    c.text(x0 + side / 2, y0 + side + 28, "x", size=10)
    c.text(10, y0 + side / 2, "y", size=10)
    # colour bar
    n = 64
    h = side / n
    for k in range(n):  # top = 1
        c.rect(bx, y0 + k * h, bw, h + 0.01, fill=_LUT[round((1 - (k + 0.5) / n) * (LEVELS - 1))])
    c.rect(bx, y0, bw, side, stroke=MUTED, width=0.8)
    for v in (0.0, 0.25, 0.5, 0.75, 1.0):
        y = y0 + (1 - v) * side
        c.line(bx + bw, y, bx + bw + 4, y, stroke=INK, width=0.8)
        c.text(bx + bw + 6, y, f"{v:g}", size=9, anchor="start")
    c.text(min(bx + bw / 2, c.width - 52), 10, "top-token probability", size=9)
    return c


def figures(data: dict, params: Params) -> list[Figure]:
    cfg = data["config"]
    G, layer, nl = cfg["grid_size"], cfg["layer"], data["n_layers"]
    if layer >= nl:
        where = "passed straight to the final layer norm and unembedding (no block runs on them)"
    else:
        runs = (f"only the last of the model's {nl} blocks runs" if nl - layer == 1 else
                f"the last {nl - layer} of the model's {nl} blocks run")
        where = f"fed in as the residual stream before block {layer}, so {runs} on them"
    how = METHOD_TEXT.get(cfg["method"], cfg["method"]).format(seed=cfg["seed"])
    cx, cy = cfg["center"]
    what = "restored token" if data.get("task") == "masked" else "next token"
    named = layout(G)["text"]
    text = ("Each cell names its top token (␠ space, ␊ newline, ␉ tab, ␍ carriage return, ∅ empty token, … cut short)." if named else
            f"At {G}×{G} the cells are too small to name their tokens: the table lists the most frequent ones and "
            f"the data file all of them.")
    caption = (
        f"Token map at layer {layer}, method {cfg['method']}: a {G}×{G} grid of points (x, y), spacing "
        f"{cfg['spacing']:g}, centred on ({cx:g}, {cy:g}), mapped to model-width vectors by {how} and {where}. "
        f"Each cell is one point; its shade is the probability of the model's most probable {what} there "
        f"(darker = more confident), and white lines separate regions with different top tokens. {text} "
        f"{data['distinct_tokens']} distinct top tokens; mean top-token probability {data['mean_probability']:.2f}.")
    alt = (f"{G} by {G} grid of cells shaded by top-token probability"
           + (", each labelled with its predicted token" if named else ""))
    return [Figure("map", caption, draw_map(data), alt=alt)]
