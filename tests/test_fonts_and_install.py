"""Every token renders (font fallback chain, code-point boxes, the report's list of them) and a fresh
machine reproduces (PDF bytes independent of WeasyPrint's font subsetter, TRM reports without the `lm`
extra, README / .ci/run / workflow in agreement)."""
from __future__ import annotations

import io
import json
import os
import random
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from conftest import make_lm, make_model, save_restoration, save_upstream, write_dataset
from reportgen import text

ROOT = Path(__file__).resolve().parents[1]
CUNEIFORM, CJK, PRIVATE = "\U00012000", "中", "\ue000"  # 𒀀 CUNEIFORM SIGN A, a Han character, private use


def _needs_noto(*families):
    missing = [f for f in families if f not in text.families()]
    if missing:
        pytest.skip(f"fonts not installed: {', '.join(missing)} (README set-up: fonts-noto-core fonts-noto-cjk)")


def test_chain_draws_cuneiform_and_cjk_and_boxes_what_no_font_has():
    _needs_noto("Noto Sans Cuneiform", "Noto Sans CJK JP")
    family = lambda ch: text.faces()[text.face_of(ch)].family  # noqa: E731
    assert family("a") == "DejaVu Sans" and family(CUNEIFORM) == "Noto Sans Cuneiform" and family(CJK) == "Noto Sans CJK JP"
    assert text.missing(f"a {CUNEIFORM}{CJK}") == []
    # private-use and zero-width characters have no glyph to show: boxed even where a font maps them
    assert text.missing(f"x{PRIVATE}y\u200b{PRIVATE}") == [PRIVATE, "\u200b"]
    assert text.boxed_text(f"x{PRIVATE}") == "xU+E000"
    assert text.families_for(f"a{CUNEIFORM}") == ["DejaVu Sans", "Noto Sans Cuneiform"]
    assert text.families_for("plain") == ["DejaVu Sans"]
    assert str(text.html(f"<{PRIVATE}")).startswith('&lt;<span class="cp"') and ">U+E000</span>" in str(text.html(PRIVATE))
    # show_token keeps such characters for the drawing to box (bytes still get \xNN)
    assert text.show_token(f"{PRIVATE}\x01 ") == f"{PRIVATE}\\x01␠"


def test_figures_draw_every_token_without_missing_glyph_warnings(tmp_path):
    _needs_noto("Noto Sans Cuneiform", "Noto Sans CJK JP")
    from reportgen.figures import Canvas, Figure, _glyphs, mpl_figure, save

    labels = ["a", CUNEIFORM, CJK, PRIVATE]
    fig, axes = mpl_figure(1, 1, size=(3, 3))
    ax = axes[0][0]
    ax.imshow([[i * j for i in range(4)] for j in range(4)])
    ax.set_xticks(range(4))
    ax.set_xticklabels(labels, rotation=90)
    ax.set_yticks(range(4))
    ax.set_yticklabels(labels)
    canvas = Canvas(200, 40)
    for i, s in enumerate(labels):
        canvas.text(20 + 40 * i, 20, s, size=16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        save(Figure("m", "", fig), tmp_path / "mpl", ("svg", "png", "pdf"))
        save(Figure("c", "", canvas), tmp_path / "canvas", ("svg", "png", "pdf"))
    assert not [w for w in caught if "missing from font" in str(w.message)], [str(w.message) for w in caught]
    svg = (tmp_path / "mpl.svg").read_text()
    # the tick labels name the family that has the glyph; the private-use one is a boxed code point
    assert re.search(r"font-family: 'DejaVu Sans', 'Noto Sans Cuneiform'[^>]*>" + CUNEIFORM + "<", svg)
    assert re.search(r"font-family: 'DejaVu Sans', 'Noto Sans CJK JP'[^>]*>" + CJK + "<", svg)
    assert ">U+E000<" in svg and PRIVATE not in svg
    # the Canvas draws the code point in a box the size of a glyph: two rows of hex digits
    texts = [it[3] for it in canvas.items if it[0] == "text"]
    assert texts[:3] == ["a", CUNEIFORM, CJK] and texts[3:] == ["E0", "00"] and PRIVATE not in canvas.svg()
    assert any(it[0] == "rect" and it[6] for it in canvas.items)  # the box: an outlined rectangle
    # PNG: the cuneiform sign is drawn with Noto Sans Cuneiform, not DejaVu's empty box
    mask, _ = _glyphs(CUNEIFORM, 40, False, "middle")
    notdef, _ = _glyphs("\U00012001", 40, False, "middle")  # another sign: a different glyph, not the same tofu
    assert mask.getbbox() is not None and mask.tobytes() != notdef.tobytes()


@pytest.fixture
def script_lm(tmp_path):
    """A tiny restoration model whose vocabulary is cuneiform, CJK, Latin and one private-use character."""
    chars = list("abcdefgh ") + [CUNEIFORM, "\U00012038", CJK, "文", PRIVATE]
    vocab = chars + ["[PAD]", "[MASK]"]
    ckpt = save_restoration(make_lm(0, vocab_size=len(vocab)), tmp_path / "scripts" / "step_5.pt", vocab=False)
    (ckpt.parent / "vocab.json").write_text(json.dumps({str(i): t for i, t in enumerate(vocab)}))
    rnd = random.Random(0)
    data = tmp_path / "eval.txt"
    data.write_text("".join(rnd.choice(chars) for _ in range(2000)), encoding="utf-8")
    return ckpt, data, vocab


def test_lm_report_lists_the_tokens_no_font_draws(script_lm, tmp_path):
    _needs_noto("Noto Sans Cuneiform", "Noto Sans CJK JP")
    ckpt, data, vocab = script_lm
    out = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "reportgen", "build", "--ckpt", str(ckpt), "--data", str(data), "--out",
                        str(out), "--seq-len", "32", "--max-seqs", "8", "--only", "predictions,attention"],
                       capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    assert "missing from font" not in r.stderr and "findfont" not in r.stderr, r.stderr
    rep = out / "scripts" / "step_5"
    html = (rep / "index.html").read_text(encoding="utf-8")
    note = re.search(r'<p class="note">([^<]*code-point boxes[^<]*)</p>', html)
    assert note and f"id {vocab.index(PRIVATE)} (U+E000)" in note.group(1), html[:3000]
    assert "1 token of the vocabulary" in note.group(1)  # the cuneiform and CJK tokens render: not listed
    assert '<span class="cp"' in html and CUNEIFORM in html and PRIVATE not in html
    svg = "".join(p.read_text(encoding="utf-8") for p in (rep / "figures").glob("*attention*.svg"))
    assert "'Noto Sans Cuneiform'" in svg and ">U+E000<" in svg


# ---------------------------------------------------------------- the same PDF bytes whichever subsetter


def _embedded_font_times(pdf: Path) -> dict:
    """Font name -> head.modified (Unix seconds) of every font program embedded in a PDF."""
    from fontTools.ttLib import TTFont
    from pypdf import PdfReader

    from reportgen.pdf import MAC_EPOCH

    out = {}
    for page in PdfReader(pdf).pages:
        for ref in page["/Resources"].get("/Font", {}).values():
            font = ref.get_object()
            for d in font.get("/DescendantFonts", [font]):
                desc = d.get_object().get("/FontDescriptor")
                for key in ("/FontFile2", "/FontFile3"):
                    if desc is not None and key in desc.get_object():
                        data = desc.get_object()[key].get_object().get_data()
                        out[str(desc.get_object()["/FontName"])] = TTFont(io.BytesIO(data))["head"].modified - MAC_EPOCH
    return out


def _page() -> str:
    from reportgen.render import render

    return render("base.html", pdf_date=None).replace(
        "</main>", f"<h1>Fonts</h1><p>Text, <code>code</code>, {CUNEIFORM} {CJK}</p></main>")


def test_pdf_bytes_do_not_depend_on_the_build_time_on_the_fonttools_path(tmp_path, monkeypatch):
    """Without HarfBuzz' subset library WeasyPrint subsets with fontTools, which stamps the current time
    into each font: two builds a second apart must still give the same bytes."""
    import weasyprint.pdf.fonts

    from reportgen.render import write_pdf

    monkeypatch.setattr(weasyprint.pdf.fonts, "harfbuzz_subset", None)  # force the fontTools path
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    page = _page()
    write_pdf(page, tmp_path, tmp_path / "a.pdf")
    time.sleep(1.2)  # fontTools' timestamps have a resolution of one second
    write_pdf(page, tmp_path, tmp_path / "b.pdf")
    assert (tmp_path / "a.pdf").read_bytes() == (tmp_path / "b.pdf").read_bytes()
    times = _embedded_font_times(tmp_path / "a.pdf")
    assert times and set(times.values()) == {0}, times  # 1970-01-01 without SOURCE_DATE_EPOCH
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    write_pdf(page, tmp_path, tmp_path / "c.pdf")
    assert set(_embedded_font_times(tmp_path / "c.pdf").values()) == {1700000000}


def test_harfbuzz_path_gets_the_same_font_times(tmp_path, monkeypatch):
    import weasyprint.pdf.fonts

    from reportgen.render import write_pdf

    if weasyprint.pdf.fonts.harfbuzz_subset is None:
        pytest.skip("HarfBuzz' subset library (libharfbuzz-subset0) is not installed")
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    write_pdf(_page(), tmp_path, tmp_path / "h.pdf")
    times = _embedded_font_times(tmp_path / "h.pdf")
    assert times and set(times.values()) == {1700000000}, times


def test_set_modified_keeps_the_font_valid():
    import matplotlib
    from fontTools.ttLib import TTFont

    from reportgen.pdf import MAC_EPOCH, _checksum, set_modified

    raw = (Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf").read_bytes()
    out = set_modified(raw, 1234567890)
    assert len(out) == len(raw) and out != raw
    assert _checksum(out) == 0xB1B0AFBA  # the whole-font checksum OpenType requires
    font = TTFont(io.BytesIO(out), checkChecksums=2)  # raises on a wrong table checksum
    assert font["head"].modified == 1234567890 + MAC_EPOCH
    assert set_modified(b"ttcf" + raw[4:], 0) == b"ttcf" + raw[4:]  # a collection is left alone


# ---------------------------------------------------------------- a fresh machine


def _without_lm_extra(tmp_path: Path) -> dict:
    """Environment whose Python cannot import the packages of the lm and slurm extras."""
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(
        "import sys\nfor name in ('transformer_lens', 'sae_lens', 'datasets', 'safetensors', 'submitit'):\n"
        "    sys.modules[name] = None  # import raises ImportError, as when the package is not installed\n")
    path = os.pathsep.join([str(shim), str(ROOT), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


def test_trm_reports_need_no_lm_extra_and_lm_checkpoints_say_what_to_install(tmp_path):
    env = _without_lm_extra(tmp_path)
    probe = subprocess.run([sys.executable, "-c", "import transformer_lens"], env=env, capture_output=True)
    assert probe.returncode != 0  # the shim works
    data = write_dataset(tmp_path / "data", n_test=4, n_train=2)
    ckpt = save_upstream(make_model(1), tmp_path / "run", 10, str(data))
    out = tmp_path / "site"
    cmd = [sys.executable, "-m", "reportgen", "build", "-q", "--out", str(out)]
    r = subprocess.run(cmd + ["--ckpt", str(ckpt), "--data", str(data), "--samples", "2"], env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (out / "run" / "step_10" / "index.html").is_file() and (out / "run" / "step_10" / "report.pdf").is_file()

    lm = save_restoration(make_lm(0), tmp_path / "lm" / "step_1.pt")
    evals = tmp_path / "eval.txt"
    evals.write_text("def f(x):\n    return x\n" * 20)
    r = subprocess.run(cmd + ["--ckpt", str(lm), "--data", str(evals), "--seq-len", "16"], env=env,
                       capture_output=True, text=True)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith(f"reportgen: error: {lm}: ") and "transformer-lens" in lines[0]
    assert "pip install 'reportgen[lm]'" in lines[0]


def _ci_script() -> str:
    return (ROOT / ".ci" / "run").read_text()


def test_readme_ci_and_workflow_install_the_same_things():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    ci = _ci_script()
    workflow = (ROOT / ".github" / "workflows" / "report.yml").read_text()
    test_cmd = ci.strip().splitlines()[-1]
    assert test_cmd.startswith("pip install torch==") and test_cmd.endswith("python -m pytest")
    blocks = re.findall(r"```\n(.*?)\n```", readme, re.S)
    assert test_cmd in blocks, "README's test command differs from .ci/run's"
    torch_line = test_cmd.split(" && ")[0]
    assert any(b.startswith(torch_line + " && pip install -e . && reportgen build") for b in blocks)
    assert torch_line in workflow and "--index-url https://download.pytorch.org/whl/cpu" in torch_line
    packages = re.search(r'^PACKAGES="([^"]+)"', ci, re.M).group(1).split()
    assert {"libharfbuzz-subset0", "fonts-noto-core", "fonts-noto-cjk"} <= set(packages)
    apt_readme = next(b for b in blocks if "apt-get install" in b)
    apt_workflow = next(ln for ln in workflow.splitlines() if "apt-get install" in ln)
    for line in (apt_readme, apt_workflow):
        assert "apt-get update" in line and line.split("install -y ")[1].split() == packages
