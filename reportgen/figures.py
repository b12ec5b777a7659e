"""Figure primitives, the shared publication style, and the SVG/PNG/PDF writers.

Two kinds of drawing:
- `Canvas`: grids of symbols (Sudoku boards, token maps) as a list of rectangles, lines and text,
  written as SVG directly and rasterised to PNG with Pillow from the same list (milliseconds);
- matplotlib `Figure`s for curves, histograms and heatmaps, in one style (`mpl_figure`).
Analyses build either and return `Figure` records; only `save` writes files.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from xml.sax.saxutils import escape

from .text import SVG_FAMILIES, boxed_text, codepoint, faces, families_for, missing, runs

FONT_FAMILY = SVG_FAMILIES.replace("'", "")  # the Canvas' SVG attribute; fallback per glyph as in text.py
DPI = 200  # default PNG resolution (--dpi): fit for print
CSS_DPI = 96  # one SVG unit / CSS px is 1/96 inch
PNG_SCALE = DPI / CSS_DPI  # raster pixels per SVG unit at the default dpi

# palette shared by boards and plots
INK = "#1f2328"
MUTED = "#6e7781"
GIVEN_BG = "#e6e8eb"
GOOD = "#1a7f37"
BAD = "#cf222e"
ACCENT = "#0969da"
CHANGED = "#f6c744"


@dataclass
class Figure:
    """One numbered figure of a report section. `drawing` is a Canvas or a matplotlib Figure."""

    key: str
    caption: str
    drawing: object
    alt: str = ""
    number: int = 0  # figure number in the report, set by the build
    stem: str = ""  # file name without extension, e.g. 01-sudoku_latents-1, set by the build
    width: int = 0  # display size in CSS px, set by the build
    height: int = 0
    files: dict = field(default_factory=dict)  # format -> path relative to the report folder, set by the build


def mix(c1: str, c2: str, t: float) -> str:
    """Colour t of the way from c1 to c2 (hex strings)."""
    a = [int(c1[i:i + 2], 16) for i in (1, 3, 5)]
    b = [int(c2[i:i + 2], 16) for i in (1, 3, 5)]
    t = min(1.0, max(0.0, float(t)))
    return "#" + "".join(f"{round(x + (y - x) * t):02x}" for x, y in zip(a, b))


_SUPERSCRIPT = str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹")


def power_of_ten(e: int) -> str:
    """A tick label 10ᵉ with a real superscript exponent (Unicode superscripts: text in SVG, PNG and PDF alike)."""
    return "1" if e == 0 else "10" if e == 1 else "10" + str(int(e)).translate(_SUPERSCRIPT)


@lru_cache(maxsize=1024)
def _rgb(c: str) -> tuple[int, int, int]:
    return tuple(int(c[i:i + 2], 16) for i in (1, 3, 5))


@lru_cache(maxsize=None)
def _font(face: int, size_px: int, bold: bool):
    """Pillow font of face `face` of the fallback chain (text.faces(); 0 is matplotlib's DejaVu Sans)."""
    from PIL import ImageFont

    f = faces()[face]
    return ImageFont.truetype(f.bold_path if bold else f.path, size_px, index=f.bold_index if bold else f.index)


@lru_cache(maxsize=4096)
def _glyphs(text: str, size_px: int, bold: bool, anchor: str):
    """Anti-aliased mask of a text run and its offset from the anchor point (cached: boards repeat digits).
    Each character is drawn by the first face of the chain that has it."""
    from PIL import Image, ImageDraw

    parts = [(_font(k or 0, size_px, bold), t) for k, t in runs(text)]
    if len(parts) == 1:
        a = {"start": "lm", "middle": "mm", "end": "rm"}[anchor]
        font = parts[0][0]
        x0, y0, x1, y1 = font.getbbox(text, anchor=a)
        mask = Image.new("L", (max(1, x1 - x0), max(1, y1 - y0)), 0)
        ImageDraw.Draw(mask).text((-x0, -y0), text, fill=255, font=font, anchor=a)
        return mask, (x0, y0)
    widths = [font.getlength(t) for font, t in parts]
    boxes = [font.getbbox(t, anchor="lm") for font, t in parts]
    top, bottom, total = min(b[1] for b in boxes), max(b[3] for b in boxes), sum(widths)
    mask = Image.new("L", (max(1, round(total) + 1), max(1, bottom - top)), 0)
    draw, x = ImageDraw.Draw(mask), 0.0
    for (font, t), w in zip(parts, widths):
        draw.text((x, -top), t, fill=255, font=font, anchor="lm")
        x += w
    return mask, (round({"start": 0, "middle": -total / 2, "end": -total}[anchor]), top)


def _run_width(face: int | None, text: str, size: float, bold: bool) -> float:
    """Width in SVG units of a run of one face at `size` (face None: a code-point box)."""
    if face is None:
        return (len(f"{ord(text):04X}") + 1) // 2 * 0.27 * size + 0.3 * size
    return _font(face, 100, bold).getlength(text) * size / 100


class Canvas:
    """A vector drawing of rectangles, lines and centred text, in SVG user units (≈ CSS px)."""

    def __init__(self, width: float, height: float, background: str = "#ffffff"):
        self.width, self.height, self.background = width, height, background
        self.items: list[tuple] = []

    def rect(self, x, y, w, h, fill=None, stroke=None, width=1.0):
        self.items.append(("rect", x, y, w, h, fill, stroke, width))

    def line(self, x1, y1, x2, y2, stroke=INK, width=1.0):
        self.items.append(("line", x1, y1, x2, y2, stroke, width))

    def text(self, x, y, s, size=10.0, fill=INK, anchor="middle", bold=False):
        """Text centred vertically on y; anchor is start, middle or end horizontally. A character no
        installed font draws becomes a box with its code point in two rows, the size of a glyph."""
        s = str(s)
        if not missing(s):
            self.items.append(("text", x, y, s, size, fill, anchor, bold))
            return
        parts = [(k, t, _run_width(k, t, size, bold)) for k, t in runs(s)]
        x -= {"start": 0, "middle": 0.5, "end": 1}[anchor] * sum(w for *_, w in parts)
        for k, t, w in parts:
            if k is not None:
                self.items.append(("text", x, y, t, size, fill, "start", bold))
            else:
                digits = codepoint(t)[2:]
                h, half = 0.9 * size, (len(digits) + 1) // 2
                self.rect(x + 0.06 * size, y - h / 2, w - 0.12 * size, h, stroke=fill, width=max(0.4, 0.05 * size))
                for row, dy in ((digits[:half], -0.21), (digits[half:], 0.21)):
                    self.items.append(("text", x + w / 2, y + dy * size, row, round(0.38 * size, 2), fill, "middle", False))
            x += w

    def svg(self) -> str:
        f = lambda v: f"{v:.2f}".rstrip("0").rstrip(".")  # noqa: E731
        out = [
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{f(self.width)}" height="{f(self.height)}" '
            f'viewBox="0 0 {f(self.width)} {f(self.height)}" font-family="{FONT_FAMILY}">',
            f'<rect width="100%" height="100%" fill="{self.background}"/>',
        ]
        for it in self.items:
            if it[0] == "rect":
                _, x, y, w, h, fill, stroke, sw = it
                attrs = f'fill="{fill or "none"}"' + (f' stroke="{stroke}" stroke-width="{f(sw)}"' if stroke else "")
                out.append(f'<rect x="{f(x)}" y="{f(y)}" width="{f(w)}" height="{f(h)}" {attrs}/>')
            elif it[0] == "line":
                _, x1, y1, x2, y2, stroke, sw = it
                out.append(f'<line x1="{f(x1)}" y1="{f(y1)}" x2="{f(x2)}" y2="{f(y2)}" stroke="{stroke}" stroke-width="{f(sw)}"/>')
            else:
                _, x, y, s, size, fill, anchor, bold = it
                weight = ' font-weight="bold"' if bold else ""
                out.append(
                    f'<text x="{f(x)}" y="{f(y)}" font-size="{f(size)}" fill="{fill}" text-anchor="{anchor}" '
                    f'dominant-baseline="central"{weight}>{escape(s)}</text>'
                )
        out.append("</svg>\n")
        return "\n".join(out)

    def png(self, dpi: int = DPI) -> bytes:
        """Raster at `dpi` (the SVG's natural size is 96 units per inch); the PNG records its dpi (pHYs)."""
        from PIL import Image, ImageDraw

        scale = dpi / CSS_DPI
        img = Image.new("RGB", (round(self.width * scale), round(self.height * scale)), _rgb(self.background))
        d = ImageDraw.Draw(img)
        s = scale
        for it in self.items:
            if it[0] == "rect":
                _, x, y, w, h, fill, stroke, sw = it
                box = [x * s, y * s, max(x * s, (x + w) * s - 1), max(y * s, (y + h) * s - 1)]
                d.rectangle(box, fill=_rgb(fill) if fill else None, outline=_rgb(stroke) if stroke else None,
                            width=max(1, round(sw * s)) if stroke else 0)
            elif it[0] == "line":
                _, x1, y1, x2, y2, stroke, sw = it
                d.line([x1 * s, y1 * s, x2 * s, y2 * s], fill=_rgb(stroke), width=max(1, round(sw * s)))
            else:
                _, x, y, text, size, fill, anchor, bold = it
                mask, (dx, dy) = _glyphs(text, round(size * s), bold, anchor)
                img.paste(_rgb(fill), (round(x * s) + dx, round(y * s) + dy), mask)
        buf = io.BytesIO()
        img.save(buf, format="PNG", compress_level=1, dpi=(dpi, dpi))  # flat colours: level 1 is small enough and fast
        return buf.getvalue()


# --- matplotlib -------------------------------------------------------------------------------

STYLE = {
    "font.family": "DejaVu Sans",
    "font.size": 8.5,
    "axes.titlesize": 9,
    "axes.labelsize": 8.5,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.color": "#d0d7de",
    "grid.linewidth": 0.5,
    "legend.frameon": False,
    "legend.fontsize": 7.5,
    "xtick.labelsize": 7.5,
    "ytick.labelsize": 7.5,
    "lines.linewidth": 1.6,
    "pdf.fonttype": 42,  # TrueType, not Type 3
    "ps.fonttype": 42,
    "svg.fonttype": "none",  # text stays text: small, fast, editable
    "svg.hashsalt": "reportgen",
    "figure.dpi": 100,
}


def mpl_figure(nrows: int = 1, ncols: int = 1, size: tuple[float, float] = (6.4, 2.6)):
    """A matplotlib Figure (no pyplot state) in the shared style, with its axes."""
    import matplotlib

    matplotlib.rcParams.update(STYLE)
    from matplotlib.figure import Figure as MplFigure

    fig = MplFigure(figsize=size)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    # fixed margins (inches) instead of constrained layout, which triples the drawing time
    w, h = size
    fig.subplots_adjust(left=0.55 / w, right=1 - 0.1 / w, bottom=0.45 / h, top=1 - 0.3 / h,
                        wspace=0.75 * ncols / w, hspace=0.8 * nrows / h)
    return fig, axes


def display_size(drawing) -> tuple[int, int]:
    """Width and height in CSS px at which a figure is shown (its SVG's natural size)."""
    if isinstance(drawing, Canvas):
        return round(drawing.width), round(drawing.height)
    w, h = drawing.get_size_inches()
    return round(w * 96), round(h * 96)


def save(fig: Figure, stem: Path, formats: tuple[str, ...] = ("svg", "png"), dpi: int = DPI) -> dict[str, Path]:
    """Write one figure as stem.<fmt> for each format (PNGs at `dpi`); returns the paths written."""
    written = {}
    d = fig.drawing
    if not isinstance(d, Canvas):
        font_fallback(d)
    for fmt in formats:
        path = stem.with_suffix("." + fmt)
        if isinstance(d, Canvas):
            if fmt == "svg":
                path.write_text(d.svg(), encoding="utf-8")
            elif fmt == "png":
                path.write_bytes(d.png(dpi))
            elif fmt == "pdf":
                _canvas_pdf(d, path)
            else:
                raise ValueError(f"unknown figure format {fmt!r}")
        else:
            save_mpl(d, path, fmt, dpi)
        written[fmt] = path
    return written


def save_mpl(fig, path: Path, fmt: str, dpi: int = DPI) -> None:
    """Save a matplotlib figure. PNGs are drawn with Agg and written as RGB (no alpha channel:
    WeasyPrint would re-encode an RGBA image twice)."""
    import matplotlib

    if fmt == "png":
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from PIL import Image

        fig.set_dpi(dpi)
        agg = FigureCanvasAgg(fig)
        agg.draw()
        img = Image.frombuffer("RGBA", agg.get_width_height(), agg.buffer_rgba(), "raw", "RGBA", 0, 1).convert("RGB")
        img.save(path, format="PNG", compress_level=1, dpi=(dpi, dpi))
        return
    with matplotlib.rc_context({"svg.hashsalt": path.stem}):  # SVG ids unique per figure
        meta = {"svg": {"Date": None}, "pdf": {"CreationDate": None, "ModDate": None}}[fmt]
        fig.savefig(path, format=fmt, metadata=meta)


def font_fallback(fig) -> None:
    """Every text of a matplotlib figure, tick labels included, gets the fallback families its characters
    need (text.families_for; plain DejaVu Sans text stays as it is), and each character no installed font
    draws is written as its code point in a box: no tofu, and no missing-glyph warning per character."""
    from matplotlib.text import Text
    from matplotlib.ticker import FixedFormatter, FuncFormatter

    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            fmt = axis.get_major_formatter()  # tick labels are re-set from it at every draw
            if isinstance(fmt, FixedFormatter):  # string labels: set_ticklabels without set_ticks
                fmt.seq = [boxed_text(str(v)) for v in fmt.seq]
            elif isinstance(fmt, FuncFormatter):  # set_ticks + set_ticklabels
                fmt.func = lambda x, pos=None, f=fmt.func: boxed_text(str(f(x, pos)))
    for t in fig.findobj(Text):
        s = t.get_text()
        if s and missing(s):
            s = boxed_text(s)
            t.set_text(s)
            if t.get_bbox_patch() is None:
                t.set_bbox({"boxstyle": "square,pad=0.12", "facecolor": "none", "edgecolor": t.get_color(), "linewidth": 0.5})
        fams = families_for(s)
        if len(fams) > 1:
            t.set_fontfamily(fams)


def _canvas_pdf(canvas: Canvas, path: Path) -> None:
    """Vector PDF of a Canvas, drawn with matplotlib's PDF backend (TrueType fonts embedded)."""
    import matplotlib

    matplotlib.rcParams.update(STYLE)
    from matplotlib.figure import Figure as MplFigure
    from matplotlib.patches import Rectangle

    w, h = canvas.width / 72, canvas.height / 72  # 1 SVG unit = 1 pt
    fig = MplFigure(figsize=(w, h))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, canvas.width)
    ax.set_ylim(canvas.height, 0)
    ax.axis("off")
    for it in canvas.items:
        if it[0] == "rect":
            _, x, y, rw, rh, fill, stroke, sw = it
            ax.add_patch(Rectangle((x, y), rw, rh, facecolor=fill or "none", edgecolor=stroke or "none", linewidth=sw if stroke else 0))
        elif it[0] == "line":
            _, x1, y1, x2, y2, stroke, sw = it
            ax.plot([x1, x2], [y1, y2], color=stroke, linewidth=sw, solid_capstyle="butt")
        else:
            _, x, y, s, size, fill, anchor, bold = it
            ax.text(x, y, s, fontsize=size, color=fill, ha={"start": "left", "middle": "center", "end": "right"}[anchor],
                    va="center_baseline", fontweight="bold" if bold else "normal")
    font_fallback(fig)
    fig.savefig(path, format="pdf", metadata={"CreationDate": None, "ModDate": None})


def metric_line(ax, xs: list, metrics: list, **kw) -> bool:
    """Metrics (reportgen.stats dicts, or bare numbers of an older report) as a line over xs, with their 95%
    intervals as a band (an error bar for a single point) where they have one; None values leave gaps. False when
    every value is None."""
    from .stats import value

    nan = float("nan")
    ys = [value(m) for m in metrics]
    if all(v is None for v in ys):
        return False
    ax.plot(xs, [nan if v is None else v for v in ys], **kw)
    lo = [m["lo"] if isinstance(m, dict) and m.get("lo") is not None else nan for m in metrics]
    hi = [m["hi"] if isinstance(m, dict) and m.get("hi") is not None else nan for m in metrics]
    if sum(v is not None for v in ys) > 1:
        ax.fill_between(xs, lo, hi, color=kw.get("color"), alpha=0.18, lw=0)
    else:  # a band needs two points: one point gets an error bar
        y = next(v for v in ys if v is not None)
        x, l, h = next((x, a, b) for x, v, a, b in zip(xs, ys, lo, hi) if v is not None)
        if l == l and h == h:  # not nan
            ax.errorbar([x], [y], yerr=[[max(0.0, y - l)], [max(0.0, h - y)]], fmt="none", ecolor=kw.get("color"),
                        elinewidth=0.8, capsize=2)
    return True
