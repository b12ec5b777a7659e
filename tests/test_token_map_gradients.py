"""token_map and gradient_flow on hand-made traces: the export keeps the probe's layout, counts are right,
the figures show what the data says (asserted on the Canvas items and matplotlib artists), and bad
parameters are refused."""
from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
from matplotlib.colors import to_rgba

from analyses import gradient_flow, token_map
from reportgen.figures import Canvas

# --- token map -------------------------------------------------------------------------------------------

VOCAB = ["a", "b", " ", "\n", "long", "<"]


def map_trace(ids, probs, spacing=1.0, center=(0.0, 0.0), layer=1, method="direct", vocab=VOCAB, n_layers=2):
    ids = np.asarray(ids, np.int32)
    G = ids.shape[0]
    axis = (np.arange(G) - (G - 1) / 2) * spacing
    xs, ys = np.meshgrid(center[0] + axis, center[1] - axis)  # as the probe lays it out: row 0 on top
    coords = np.stack([xs.ravel(), ys.ravel()], 1).astype(np.float32)
    spec = {"grid_size": G, "spacing": spacing, "center": list(center), "method": method, "seed": 3}
    assert np.array_equal(coords, token_map.grid_coords(spec))  # the analysis lays the grid out the same way
    return SimpleNamespace(vocab=vocab, n_layers=n_layers,
                           run_from={"ids": ids.ravel(), "probs": np.asarray(probs, np.float32).ravel(), "layer": layer,
                                     "batch_size": 4, "vectors": spec})


# 3×3: "a" wins 4 cells, "b" 3, " " 1, "\n" 1
IDS = [[0, 0, 1],
       [0, 2, 1],
       [0, 3, 1]]
PROBS = [[0.9, 0.8, 0.3],
         [0.7, 0.5, 0.2],
         [0.1, 0.6, 0.4]]


def test_export_keeps_row_column_order_and_counts_top_tokens():
    tr = map_trace(IDS, PROBS, spacing=2.0, center=(10.0, -1.0))
    d = token_map.compute(tr, token_map.Params(grid_size=3, spacing=2.0, center=[10, -1], layer=-1, method="direct"))
    assert d["token_ids"] == IDS
    assert d["probabilities"] == [[pytest.approx(p, abs=1e-6) for p in row] for row in PROBS]
    assert d["token_strings"] == [["a", "a", "b"], ["a", " ", "b"], ["a", "\n", "b"]]
    # row-major, row 0 on top: first point is top-left (smallest x, largest y), second is one step right
    assert d["coordinates"][0] == [8.0, 1.0]
    assert d["coordinates"][1] == [10.0, 1.0]
    assert d["coordinates"][3] == [8.0, -1.0]
    assert d["coordinates"][8] == [12.0, -3.0]
    assert d["distinct_tokens"] == 4
    top = d["top_tokens"]
    assert [(t["id"], t["token"], t["cells"]) for t in top] == [(0, "a", 4), (1, "b", 3), (2, " ", 1), (3, "\n", 1)]
    assert top[0]["share"] == pytest.approx(4 / 9, abs=1e-6)
    assert top[0]["mean_probability"] == pytest.approx((0.9 + 0.8 + 0.7 + 0.1) / 4, abs=1e-6)
    assert top[1]["mean_probability"] == pytest.approx(0.3, abs=1e-6)
    assert top[2]["shown"] == "␠" and top[3]["shown"] == "␊"
    # the config is what the probe ran (its resolved layer), and the whole export is plain JSON
    assert d["config"] == {"grid_size": 3, "spacing": 2.0, "center": [10.0, -1.0], "layer": 1, "method": "direct",
                           "seed": 3, "batch_size": 4}
    assert json.loads(json.dumps(d)) == d
    m = token_map.metrics(d)["token_map_distinct"]
    assert (m["value"], m["n"], m["interval"]) == (4, 9, "none")


def test_top_tokens_are_at_most_ten_most_frequent_first_ties_by_id():
    G = 12
    ids = np.arange(G * G).reshape(G, G) % 12  # each of 12 tokens wins 12 cells...
    ids[0, :3] = 11  # ...except 11 wins 3 more (from tokens 0, 1, 2)
    vocab = [f"t{i}" for i in range(12)]
    d = token_map.compute(map_trace(ids, np.full((G, G), 0.5), vocab=vocab), token_map.Params(grid_size=G))
    assert len(d["top_tokens"]) == 10
    assert [t["id"] for t in d["top_tokens"]] == [11, 3, 4, 5, 6, 7, 8, 9, 10, 0]
    assert d["top_tokens"][0]["cells"] == 15


def grid_texts(c: Canvas, G: int):
    """Text items inside the map's grid, as {(row, col): (text, colour)}."""
    L = token_map.layout(G)
    out = {}
    for it in c.items:
        if it[0] == "text":
            _, x, y, s, size, fill, anchor, bold = it
            col, row = (x - L["x0"]) / L["cell"] - 0.5, (y - L["y0"]) / L["cell"] - 0.5
            if -1e-6 <= col <= G - 1 + 1e-6 and -1e-6 <= row <= G - 1 + 1e-6:
                assert abs(col - round(col)) < 1e-6 and abs(row - round(row)) < 1e-6, "label not centred in its cell"
                out[(round(row), round(col))] = (s, fill)
    return out


def grid_fills(c: Canvas, G: int):
    L = token_map.layout(G)
    out = {}
    for it in c.items:
        if it[0] == "rect" and it[5] is not None:
            _, x, y, w, h, fill, stroke, sw = it
            col, row = (x - L["x0"]) / L["cell"], (y - L["y0"]) / L["cell"]
            if -1e-6 <= col < G and -1e-6 <= row < G and abs(w - L["cell"]) < 0.1:
                out[(round(row), round(col))] = fill
    return out


def luminance(hex_colour: str) -> float:
    r, g, b = (int(hex_colour[i:i + 2], 16) for i in (1, 3, 5))
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def test_figure_has_one_label_per_cell_and_darker_cells_for_higher_probability():
    vocab = ["a", "b", " ", "\n", "long", "<"]
    ids = [[0, 4, 1], [5, 2, 1], [0, 3, 1]]
    d = token_map.compute(map_trace(ids, PROBS, vocab=vocab), token_map.Params(grid_size=3))
    [fig] = token_map.figures(d, token_map.Params(grid_size=3))
    c = fig.drawing
    assert isinstance(c, Canvas) and c.width <= 720
    texts = grid_texts(c, 3)
    assert {k: v[0] for k, v in texts.items()} == {
        (0, 0): "a", (0, 1): "lo…", (0, 2): "b",
        (1, 0): "<", (1, 1): "␠", (1, 2): "b",
        (2, 0): "a", (2, 1): "␊", (2, 2): "b"}
    fills = grid_fills(c, 3)
    assert len(fills) == 9
    order = sorted(fills, key=lambda rc: PROBS[rc[0]][rc[1]])  # cells by rising probability...
    lum = [luminance(fills[rc]) for rc in order]
    assert all(a > b for a, b in zip(lum, lum[1:]))  # ...get strictly darker
    assert texts[(0, 0)][1] == "#ffffff" and texts[(2, 0)][1] != "#ffffff"  # white text on dark (p=0.9), ink on light
    # the SVG escapes token text and the caption names the layer, method, spacing and grid size
    svg = c.svg()
    assert "&lt;" in svg and "<text" in svg
    for s in ("layer 1", "direct", "spacing 1", "3×3"):
        assert s in fig.caption
    assert fig.alt


def test_region_boundaries_follow_token_changes():
    ids = [[0, 0], [1, 1]]  # one horizontal boundary between the rows, none between the columns
    d = token_map.compute(map_trace(ids, [[0.5, 0.5], [0.5, 0.5]]), token_map.Params(grid_size=2))
    c = token_map.draw_map(d)
    L = token_map.layout(2)
    inner = [it for it in c.items if it[0] == "line" and it[5] == token_map.BOUNDARY]
    assert len(inner) == 1
    _, x1, y1, x2, y2, *_ = inner[0]
    assert (x1, x2) == (L["x0"], L["x0"] + 2 * L["cell"]) and y1 == y2 == L["y0"] + L["cell"]


def test_big_grids_drop_cell_labels_and_say_so():
    G = 80
    d = token_map.compute(map_trace(np.zeros((G, G), int), np.full((G, G), 0.5)), token_map.Params(grid_size=G))
    [fig] = token_map.figures(d, token_map.Params(grid_size=G))
    assert token_map.layout(G)["cell"] < token_map.TEXT_MIN_CELL
    assert grid_texts(fig.drawing, G) == {}
    assert len(grid_fills(fig.drawing, G)) == G * G
    assert "too small" in fig.caption
    assert fig.drawing.width <= 720


def test_colour_bar_ticks():
    d = token_map.compute(map_trace(IDS, PROBS), token_map.Params(grid_size=3))
    texts = [it[3] for it in token_map.draw_map(d).items if it[0] == "text"]
    for t in ("0", "0.25", "0.5", "0.75", "1", "top-token probability"):
        assert t in texts


def test_token_map_params_are_validated():
    p = token_map.Params()
    assert (p.grid_size, p.spacing, p.center, p.layer, p.method, p.seed, p.batch_size) == \
        (50, 0.5, [0.0, 0.0], -1, "random_projection", 0, 100)
    assert token_map.Params(center=(1, 2)).center == [1.0, 2.0]
    assert token_map.Params(center="1.5, -2").center == [1.5, -2.0]  # as --param token_map.center=1.5,-2 gives it
    for bad in ({"method": "pca"}, {"grid_size": 0}, {"grid_size": -3}, {"grid_size": 2.5}, {"spacing": 0},
                {"center": [1.0]}, {"center": "a,b"}, {"layer": -2}, {"batch_size": 0}, {"method": "direct", "seed": -1}):
        with pytest.raises(ValueError):
            token_map.Params(**bad)
    with pytest.raises(ValueError, match="method"):
        token_map.Params(method="pca")
    need = token_map.needs(token_map.Params(grid_size=7, center=[1, 2], method="direct"))["run_from_layer"]
    assert (need["layer"], need["count"], need["batch_size"]) == (-1, 49, 100)
    assert need["vectors"].spec == {"grid_size": 7, "spacing": 0.5, "center": [1.0, 2.0], "method": "direct", "seed": 0}
    v = need["vectors"](slice(0, 49), 6)  # direct: x, y in the first two dimensions, row 0 at the top
    assert v.shape == (49, 6) and v[0, :2].tolist() == [1.0 - 1.5, 2.0 + 1.5] and not v[:, 2:].any()
    assert token_map.resolve_layer(-1, 4) == 3 and token_map.resolve_layer(4, 4) == 4
    with pytest.raises(ValueError):
        token_map.resolve_layer(5, 4)


def test_partial_renders_tokens_escaped():
    from reportgen.render import environment

    d = token_map.compute(map_trace([[5, 5], [0, 1]], [[0.5, 0.5], [0.5, 0.5]]), token_map.Params(grid_size=2))
    html = environment().from_string('{% set ns = namespace(table=0) %}{% include "partials/token_map.html" %}').render(
        s={"data": d, "figures": []}, src={}, links=False)
    assert "<code>&lt;</code>" in html and "Table 1." in html and "<script" not in html


# --- gradient flow ---------------------------------------------------------------------------------------

GRADS = [
    ("embed.W_E", 0.5),
    ("pos_embed.W_pos", 0.0),  # zero gradient: vanishing
    ("blocks.0.ln1.w", 3.0), ("blocks.0.attn.W_Q", 4.0), ("blocks.0.mlp.W_in", 12.0),  # W_in explodes
    ("blocks.1.ln1.w", 1e-6), ("blocks.1.attn.W_Q", 2e-6), ("blocks.1.mlp.W_out", 2e-6),  # all vanish
    ("ln_final.w", 0.1), ("ln_final.b", 0.2),
    ("unembed.W_U", 20.0), ("unembed.b_U", 0.3),
]


def grad_data(grads=GRADS, **kw):
    p = gradient_flow.Params(**kw)
    return gradient_flow.compute(SimpleNamespace(gradients=grads, n_layers=2), p), p


def test_statuses_against_thresholds_and_layer_norms():
    d, _ = grad_data()
    st = {p["name"]: p["status"] for p in d["parameters"]}
    assert st["blocks.1.ln1.w"] == "vanishing" and st["pos_embed.W_pos"] == "vanishing"
    assert st["unembed.W_U"] == "exploding" and st["blocks.0.mlp.W_in"] == "exploding"
    assert st["embed.W_E"] == "normal" and st["blocks.0.attn.W_Q"] == "normal"
    assert d["counts"] == {"normal": 6, "vanishing": 4, "exploding": 2}
    layers = {r["layer"]: r for r in d["layers"]}
    assert [r["layer"] for r in d["layers"]] == ["embed", "block 0", "block 1", "ln_final", "unembed"]
    assert layers["block 0"]["norm"] == pytest.approx(13.0)  # sqrt(9 + 16 + 144)
    assert layers["block 0"]["status"] == "exploding"
    assert layers["block 1"]["norm"] == pytest.approx(3e-6)  # sqrt(1 + 4 + 4) * 1e-6
    assert layers["block 1"]["status"] == "vanishing"
    assert layers["embed"]["norm"] == pytest.approx(0.5) and layers["embed"]["status"] == "normal"
    groups = {(g["layer"], g["group"]): g for g in d["groups"]}
    assert list(groups) == [("embed", "embed"), ("block 0", "attn"), ("block 0", "mlp"), ("block 0", "ln"),
                            ("block 1", "attn"), ("block 1", "mlp"), ("block 1", "ln"), ("ln_final", "ln"),
                            ("unembed", "unembed")]
    assert groups[("ln_final", "ln")]["norm"] == pytest.approx(math.sqrt(0.05))
    assert groups[("block 0", "mlp")]["status"] == "exploding" and groups[("block 0", "attn")]["status"] == "normal"
    assert d["max"] == {"name": "unembed.W_U", "norm": 20.0}
    assert d["min"] == {"name": "pos_embed.W_pos", "norm": 0.0}
    assert json.loads(json.dumps(d)) == d
    m = gradient_flow.metrics(d)
    assert m["grad_norm_max"]["value"] == 20.0 and m["grad_vanishing"]["value"] == 4 and m["grad_exploding"]["value"] == 2
    assert m["grad_norm_max"]["n"] == d["batch"] and m["grad_vanishing"]["n"] == len(d["parameters"])


def test_thresholds_are_parameters_and_model_order_is_kept():
    shuffled = [GRADS[i] for i in (10, 3, 0, 8, 6, 2)]  # layers in model order; within a layer, as given
    d, _ = grad_data(shuffled, vanishing=0.3, exploding=100.0)
    assert [p["name"] for p in d["parameters"]] == ["embed.W_E", "blocks.0.attn.W_Q", "blocks.0.ln1.w",
                                                    "blocks.1.attn.W_Q", "ln_final.w", "unembed.W_U"]
    assert [p["status"] for p in d["parameters"]] == ["normal", "normal", "normal", "vanishing", "vanishing", "normal"]


def test_non_finite_gradients_count_as_exploding_and_stay_json():
    d, _ = grad_data([("blocks.0.attn.W_Q", float("nan")), ("blocks.0.mlp.W_in", 1.0)])
    assert d["parameters"][0]["norm"] is None and d["parameters"][0]["status"] == "exploding"
    assert d["layers"][0]["norm"] is None and d["layers"][0]["status"] == "exploding"
    assert d["non_finite"] == ["blocks.0.attn.W_Q"] and d["max"]["name"] == "blocks.0.mlp.W_in"
    json.dumps(d, allow_nan=False)
    gradient_flow.figures(d, gradient_flow.Params())  # draws without error


def bar_colours(fig):
    ax = fig.axes[0]
    return [p.get_facecolor() for p in ax.patches], [p.get_height() for p in ax.patches]


def test_bar_colours_and_heights_match_statuses():
    d, p = grad_data()
    f1, f2 = gradient_flow.figures(d, p)
    want = {s: to_rgba(c) for s, c in {"normal": "#0969da", "vanishing": "#cf222e", "exploding": "#e16f24"}.items()}
    colours, heights = bar_colours(f1.drawing)
    assert colours == [want[r["status"]] for r in d["layers"]]
    assert heights == pytest.approx([r["norm"] for r in d["layers"]])
    colours, heights = bar_colours(f2.drawing)
    assert colours == [want[g["status"]] for g in d["groups"]]
    ax = f1.drawing.axes[0]
    assert ax.get_yscale() == "log"
    dashed = sorted(ln.get_ydata()[0] for ln in ax.get_lines() if ln.get_linestyle() == "--")
    assert dashed == [1e-5, 10.0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["embed", "block 0", "block 1", "ln_final", "unembed"]
    assert "unembed.W_U" in f1.caption and "pos_embed.W_pos" in f1.caption  # largest and smallest named
    assert {"normal", "vanishing", "exploding"} <= {t.get_text() for t in ax.get_legend().get_texts()}


def test_gradient_params_are_validated():
    assert gradient_flow.needs(gradient_flow.Params(batch=3)) == {"gradients": {"batch": 3}}
    for bad in ({"vanishing": 0}, {"vanishing": 20.0}, {"vanishing": 1.0, "exploding": 1.0}, {"batch": 0},
                {"exploding": float("inf")}):
        with pytest.raises(ValueError):
            gradient_flow.Params(**bad)


def test_gradient_partial_renders():
    from reportgen.render import environment

    d, _ = grad_data()
    html = environment().from_string('{% set ns = namespace(table=0) %}{% include "partials/gradient_flow.html" %}'
                                     ).render(s={"data": d, "figures": []}, src={}, links=False)
    assert "Table 1." in html and "block 1" in html and "vanishing" in html and "<script" not in html


@pytest.mark.parametrize("name,group", [
    ("blocks.0.attn.W_Q", "attn"), ("blocks.0.mlp.W_in", "mlp"), ("blocks.0.ln1.w", "ln"),
    # a hand-written model (examples/hierarchical): fused qkv and its output projection, an nn.Sequential MLP
    ("blocks.1.qkv.weight", "attn"), ("blocks.1.out.bias", "attn"), ("blocks.1.mlp.0.weight", "mlp"),
    ("blocks.1.ln2.bias", "ln"),
    # Hugging Face module names
    ("blocks.2.self_attn.q_proj.weight", "attn"), ("blocks.2.mlp.gate_proj.weight", "mlp"),
    ("blocks.2.input_layernorm.weight", "ln"), ("blocks.2.post_attention_layernorm.weight", "ln"),
    ("blocks.3.ffn.fc1.weight", "mlp"), ("blocks.3.feed_forward.w1.weight", "mlp"),
    ("blocks.3.attention.dense.weight", "attn"), ("blocks.3.norm1.weight", "ln"),
    ("blocks.4.scale", "other"), ("blocks.4.router.weight", "other"),
])
def test_block_parameters_are_grouped_by_module_name(name, group):
    layer, got, _ = gradient_flow.classify(name)
    assert (layer, got) == (f"block {name.split('.')[1]}", group)
