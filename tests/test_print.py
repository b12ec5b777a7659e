"""Figures and tables for print: what a reader of the PDF relies on, checked on the artists, the exported data
and the HTML (labels for every shown token, colour bars, repeated table headers, the PNG resolution, legends)."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import analyses.attention as A
from conftest import make_lm
from reportgen.errors import ReportgenError
from reportgen.text import show_token
@pytest.fixture(scope="module")
def attention_data():
    """The attention analysis's data from a real probe of a tiny bidirectional model (2 layers, 2 heads)."""
    from reportgen.models.lm import LMSubject
    from reportgen.probes.lm import probe_lm
    from reportgen.models.restoration import to_hooked

    ref = make_lm(3)
    model = to_hooked(ref.state_dict(), ref.cfg)
    vocab = [chr(i) for i in range(256)] + ["[PAD]", "[MASK]"]
    subject = LMSubject(ref=None, model=model, format="restoration", causal=False, config_rows=[], vocab=vocab,
                        vocab_source="", byte_level=True, mask_id=257, pad_id=256)
    text = "a b\nc\td\re" * 8
    tokens = np.array([[ord(c) for c in text[:40]], [ord(c) for c in text[1:41]]])
    scored = np.zeros_like(tokens, dtype=bool)
    p = A.Params(max_tokens=24)
    tr = probe_lm(subject, tokens, tokens, scored, A.needs(p), "cpu")
    return A.compute(tr, p)


def image_axes(fig):
    return [ax for ax in fig.axes if ax.images]


def bars(fig):
    return [ax for ax in fig.axes if ax.get_label() == "colour bar"]


def test_every_shown_token_is_a_tick_label_with_query_and_key_titles(attention_data):
    d = attention_data
    figs = A.figures(d, A.Params())
    layers = [f for f in figs if f.key.startswith("layers")]
    assert len(layers) == 1
    axes = image_axes(layers[0].drawing)
    assert len(axes) == len(d["pattern_mean_over_heads"])
    shown = [show_token(t) for t in d["tokens"]]
    assert {"␠", "␊", "␉", "␍"} <= set(shown)  # control characters drawn as visible glyphs
    for k, ax in enumerate(axes):
        assert [t.get_text() for t in ax.get_xticklabels()] == shown
        assert "key" in ax.get_xlabel()
        assert all(t.get_fontsize() >= 6 for t in ax.get_xticklabels())
    assert [t.get_text() for t in axes[0].get_yticklabels()] == shown and "query" in axes[0].get_ylabel()
    # the caption explains every symbol used
    for sym in ("␠ space", "␊ line feed", "␉ tab", "␍ carriage return"):
        assert sym in layers[0].caption


def test_colour_scale_shared_log_or_one_per_panel(attention_data):
    from matplotlib.colors import LogNorm

    d = attention_data
    fig = A.figures(d, A.Params())[0].drawing
    norms = [ax.images[0].norm for ax in image_axes(fig)]
    assert all(isinstance(n, LogNorm) and (n.vmin, n.vmax) == (A.LOG_FLOOR, 1.0) for n in norms)
    assert len(bars(fig)) == 1
    fig = A.figures(d, A.Params(scale="panel"))[0].drawing
    axes = image_axes(fig)
    for li, ax in enumerate(axes):  # each panel's own scale: its top is that layer's largest weight
        assert ax.images[0].norm.vmax == pytest.approx(np.max(d["pattern_mean_over_heads"][li]))
    assert len(bars(fig)) == len(axes)


def test_head_grid_has_a_colour_bar_and_no_text_on_the_data(attention_data):
    d = attention_data
    heads = [f for f in A.figures(d, A.Params()) if f.key.startswith("heads")]
    assert len(heads) == 1
    fig = heads[0].drawing
    axes = image_axes(fig)
    L, H = len(d["pattern_heads"]), len(d["pattern_heads"][0])
    assert len(axes) == L * H
    (bar,) = bars(fig)
    assert "attention weight" in bar.get_ylabel()
    ent = {(h["layer"], h["head"]): h["mean"] for h in d["entropy"]["heads"]}
    for k, ax in enumerate(axes):
        assert not ax.texts  # labels sit in the titles, off the heatmap
        assert f"{ent[divmod(k, H)]:.2f}" in ax.get_title()


def test_layers_and_heads_are_selectable(attention_data):
    d = attention_data
    figs = A.figures(d, A.Params(layers="1", head_ids="0"))
    (lay,) = [f for f in figs if f.key.startswith("layers")]
    (hd,) = [f for f in figs if f.key.startswith("heads")]
    assert [ax.get_title() for ax in image_axes(lay.drawing)] == ["layer 1"]
    assert len(image_axes(hd.drawing)) == 1 and image_axes(hd.drawing)[0].get_title().startswith("H0")
    np.testing.assert_allclose(image_axes(lay.drawing)[0].images[0].get_array(),
                               np.maximum(d["pattern_mean_over_heads"][1], A.LOG_FLOOR))
    with pytest.raises(ReportgenError, match="attention.layers: 5 does not exist"):
        A.figures(d, A.Params(layers="0,5"))
    assert A.parse_selection("0,2-3", "layers") == [0, 2, 3] and A.parse_selection([1], "layers") == [1]
    for bad in ({"layers": "two"}, {"head_ids": "1-"}, {"scale": "linear"}):
        with pytest.raises(ValueError):
            A.Params(**bad)


def test_a_long_model_is_drawn_as_page_sized_small_multiples(attention_data):
    d = dict(attention_data)
    L, H, n = 16, 8, len(d["tokens"])
    p = np.random.default_rng(0).dirichlet(np.ones(n), size=(L, H, n))
    d["pattern_heads"], d["pattern_mean_over_heads"] = p.tolist(), p.mean(1).tolist()
    d["entropy"] = {**d["entropy"], "heads": [{"layer": li, "head": h, "mean": 1.0, "std": 0.0, "min": 1.0, "max": 1.0,
                                               "reading": "normal"} for li in range(L) for h in range(H)]}
    figs = A.figures(d, A.Params())
    layers = [f for f in figs if f.key.startswith("layers")]
    heads = [f for f in figs if f.key.startswith("heads")]
    assert len(layers) > 1 and len(heads) > 1
    titles = [ax.get_title() for f in layers for ax in image_axes(f.drawing)]
    assert titles == [f"layer {i}" for i in range(L)]  # every layer once, in order, over several figures
    assert sum(len(image_axes(f.drawing)) for f in heads) == L * H
    for f in layers + heads:
        w, h = f.drawing.get_size_inches()
        assert w <= A.PAGE_W + 1e-6 and h <= A.PAGE_H + 1e-6  # each fits a page at its printed size
        assert "part" in f.caption


def test_png_resolution_follows_dpi(tmp_path):
    from PIL import Image

    from reportgen.figures import Canvas, Figure, mpl_figure, save

    fig, _ = mpl_figure(1, 1, size=(4.0, 2.0))
    c = Canvas(192, 96)
    c.text(96, 48, "x")
    for dpi in (100, 300):
        for name, drawing, inches in (("chart", fig, (4.0, 2.0)), ("board", c, (2.0, 1.0))):
            path = save(Figure(name, "", drawing), tmp_path / f"{name}-{dpi}", ("png",), dpi=dpi)["png"]
            im = Image.open(path)
            assert im.size == (round(inches[0] * dpi), round(inches[1] * dpi))
            assert [round(v) for v in im.info["dpi"]] == [dpi, dpi]  # pHYs: printed at its size


def test_density_ticks_are_real_superscripts():
    import analyses.sae_features as S
    from reportgen.figures import power_of_ten

    assert power_of_ten(-5) == "10⁻⁵" and power_of_ten(0) == "1" and power_of_ten(-12) == "10⁻¹²"
    data = {"density_histogram": {"counts": [1, 2, 3, 4, 5], "edges": [-5, -4, -3, -2, -1, 0]}, "dead": 0, "d_sae": 8,
            "alive": 8, "tokens": 1000, "l0": 2.0}
    (fig,) = S.figures(data, S.Params())
    texts = [it[3] for it in fig.drawing.items if it[0] == "text"]
    assert "10⁻⁵" in texts and "10⁻¹" in texts and not any("^" in t for t in texts)


def test_board_symbols_are_explained_where_drawn():
    from analyses import step_evolution, sudoku_latents
    from reportgen.boards import symbol_key
    from reportgen.figures import Canvas
    from test_probe_and_analyses import hand_trace

    assert symbol_key(Canvas(10, 10)) == ""
    tr = hand_trace()
    tr.arrays["z_H_tokens"][:, 0, 10] = 0  # PAD nearest to one latent cell
    d = sudoku_latents.compute(tr, sudoku_latents.Params())
    first, second = sudoku_latents.figures(d, sudoku_latents.Params())
    assert "∅" in [it[3] for it in first.drawing.items if it[0] == "text"]
    assert "∅ = PAD" in first.caption and "· = the blank token" in first.caption
    assert "∅" not in second.caption
    ev = step_evolution.compute(tr, step_evolution.Params())
    for f in step_evolution.figures(ev, step_evolution.Params()):
        drawn = {it[3] for it in f.drawing.items if it[0] == "text"}
        assert ("∅" in drawn) == ("∅ = PAD" in f.caption)


def test_sae_trained_on_another_checkpoint_is_stated():
    from reportgen.checkpoints import CheckpointRef
    from reportgen.kinds.lm import sae_note, sae_source

    ref = CheckpointRef(path=Path("ckpts/run/step_200.pt"), run="run", name="step_200", step=200)
    info = {"folder": "sae/x", "trained_on": "run/step_800"}
    other = sae_source(info, ref)
    assert other["trained_on_this"] is False
    assert "run/step_800, a different checkpoint" in sae_note(other, "run/step_200")
    assert sae_source({**info, "trained_on": "run/step_200"}, ref)["trained_on_this"] is True
    assert sae_note(sae_source({**info, "trained_on": "run/step_200"}, ref), "run/step_200") is None
    unknown = sae_source({**info, "trained_on": None}, ref)
    assert unknown["trained_on_this"] is None and "does not record" in sae_note(unknown, "run/step_200")
    assert sae_source({"folder": "sae/", "trained_on": "run"}, ref)["trained_on_this"] is True  # --train-sae


def test_caption_lines_do_not_break_oddly(tmp_path):
    """The solving-stats caption once printed 'correct' alone on a line (white space before </figcaption>), and a
    caption's last word could stand alone; laid out by WeasyPrint, every caption line but the last is full."""
    from pypdf import PdfReader

    from reportgen.figures import Canvas, Figure
    from reportgen.render import render, write_pdf

    (tmp_path / "x.png").write_bytes(Canvas(8, 8).png())
    cap = ("Accuracy and revisions per ACT step over 5 puzzles. (a) Fraction of blank cells predicted correctly and "
           "fraction of boards fully correct after each step. (b) Mean number of cells whose prediction changed from "
           "the previous step: a model that has settled stops revising.")
    f = Figure("x", cap, None, number=11, stem="s", width=8, height=8)
    page = render("run.html", run="r", rows=[], figures=[f], version="0", columns=[], src={"s": "x.png"}, links=False,
                  has_pdf=False)
    assert "stops&nbsp;revising.</figcaption>" in page
    write_pdf(page, tmp_path, tmp_path / "p.pdf")
    text = PdfReader(tmp_path / "p.pdf").pages[0].extract_text()
    lines = [ln.strip() for ln in text[text.index("Figure 11."):].splitlines()]
    lines = lines[:next(i for i, ln in enumerate(lines) if ln.endswith("revising."))  + 1]
    assert len(lines) >= 2 and all(len(ln.split()) > 3 for ln in lines), lines


def test_predictions_table_prints_with_its_header_on_every_page(tmp_path):
    """A long predictions table in a real build: <thead> repeated by the print CSS on each PDF page it spans, a
    header for every column, no constant column, … where the context window cuts; PNGs at --dpi; the LM run
    overview does not speak of ACT steps."""
    from PIL import Image
    from pypdf import PdfReader

    from conftest import EVAL_TEXT, save_restoration

    ckpt = save_restoration(make_lm(0), tmp_path / "lm run" / "step_10.pt")
    text = tmp_path / "eval.txt"
    text.write_text(EVAL_TEXT)
    out = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "reportgen", "build", "-q", "--ckpt", str(ckpt), "--data", str(text),
                        "--out", str(out), "--seq-len", "32", "--samples", "24", "--dpi", "100",
                        "--only", "predictions", "--param", "predictions.max_rows=70"],
                       capture_output=True, text=True, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    rep = out / "lm-run" / "step_10"
    html = (rep / "index.html").read_text()
    table = html[html.index('<table class="preds">'):]
    table = table[:table.index("</table>")]
    head = table[table.index("<thead>"):table.index("</thead>")]
    ths = re.findall(r"<th(?:\s[^>]*)?>(.*?)</th>", head)
    assert ths == ["seq.", "pos.", "context", "original", "top-5 predictions", "right"]  # "seen" is constant here
    assert re.search(r"thead\s*\{\s*display:\s*table-header-group", html)
    data = json.loads((rep / "data" / "predictions.json").read_text())
    rows = data["rows"]
    assert len(rows) > 40  # long enough to span pages
    cut = [r for r in rows if r["position"] > len(r["left"])]
    assert cut and table.count('<span class="cut">…</span>') >= len(cut)
    pages = [p.extract_text() for p in PdfReader(rep / "report.pdf").pages]
    with_rows = [p for p in pages if re.search(r"\d+\s+\d+\s+\S.*[✓✗]", p)]
    assert len(with_rows) >= 2 and all("top-5 predictions" in p and "seq." in p for p in with_rows)
    pngs = sorted((rep / "figures").glob("*.png")) + sorted((out / "lm-run" / "figures").glob("*.png"))
    assert any(p.parent.parent.name == "lm-run" for p in pngs)  # the run overview's figures too
    assert all([round(v) for v in Image.open(p).info["dpi"]] == [100, 100] for p in pngs)
    assert "ACT" not in (out / "lm-run" / "index.html").read_text()
