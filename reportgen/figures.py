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

FONT_FAMILY = "DejaVu Sans, Verdana, Arial, sans-serif"
PNG_SCALE = 1.5  # raster pixels per SVG unit

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


@lru_cache(maxsize=1024)
def _rgb(c: str) -> tuple[int, int, int]:
    return tuple(int(c[i:i + 2], 16) for i in (1, 3, 5))


@lru_cache(maxsize=None)
def _font(size_px: int, bold: bool):
    import matplotlib
    from PIL import ImageFont

    name = "DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"
    return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / name), size_px)


@lru_cache(maxsize=4096)
def _glyphs(text: str, size_px: int, bold: bool, anchor: str):
    """Anti-aliased mask of a text run and its offset from the anchor point (cached: boards repeat digits)."""
    from PIL import Image, ImageDraw

    a = {"start": "lm", "middle": "mm", "end": "rm"}[anchor]
    font = _font(size_px, bold)
    x0, y0, x1, y1 = font.getbbox(text, anchor=a)
    mask = Image.new("L", (max(1, x1 - x0), max(1, y1 - y0)), 0)
    ImageDraw.Draw(mask).text((-x0, -y0), text, fill=255, font=font, anchor=a)
    return mask, (x0, y0)


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
        """Text centred vertically on y; anchor is start, middle or end horizontally."""
        self.items.append(("text", x, y, str(s), size, fill, anchor, bold))

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

    def png(self, scale: float = PNG_SCALE) -> bytes:
        from PIL import Image, ImageDraw

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
        img.save(buf, format="PNG", compress_level=1)  # flat colours: level 1 is small enough and fast
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
    "savefig.dpi": 120,
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


def save(fig: Figure, stem: Path, formats: tuple[str, ...] = ("svg", "png")) -> dict[str, Path]:
    """Write one figure as stem.<fmt> for each format; returns the paths written."""
    written = {}
    d = fig.drawing
    for fmt in formats:
        path = stem.with_suffix("." + fmt)
        if isinstance(d, Canvas):
            if fmt == "svg":
                path.write_text(d.svg(), encoding="utf-8")
            elif fmt == "png":
                path.write_bytes(d.png())
            elif fmt == "pdf":
                _canvas_pdf(d, path)
            else:
                raise ValueError(f"unknown figure format {fmt!r}")
        else:
            save_mpl(d, path, fmt)
        written[fmt] = path
    return written


def save_mpl(fig, path: Path, fmt: str) -> None:
    """Save a matplotlib figure. PNGs are drawn with Agg and written as RGB (no alpha channel:
    WeasyPrint would re-encode an RGBA image twice)."""
    import matplotlib

    if fmt == "png":
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from PIL import Image

        dpi = STYLE["savefig.dpi"]
        fig.set_dpi(dpi)
        agg = FigureCanvasAgg(fig)
        agg.draw()
        img = Image.frombuffer("RGBA", agg.get_width_height(), agg.buffer_rgba(), "raw", "RGBA", 0, 1).convert("RGB")
        img.save(path, format="PNG", compress_level=1, dpi=(dpi, dpi))
        return
    with matplotlib.rc_context({"svg.hashsalt": path.stem}):  # SVG ids unique per figure
        meta = {"svg": {"Date": None}, "pdf": {"CreationDate": None, "ModDate": None}}[fmt]
        fig.savefig(path, format=fmt, metadata=meta)


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
