"""Jinja environment (templates shipped in the package or in a checkout) and the PDF writer."""
from __future__ import annotations

import os
import sys
from functools import lru_cache
from pathlib import Path

from .stats import value  # a metric dict's number (numpy, which every caller has loaded already)


def templates_dir() -> Path:
    """templates/ beside the package in a checkout, or reportgen/templates in a wheel."""
    here = Path(__file__).resolve().parent
    for cand in (here / "templates", here.parent / "templates"):
        if (cand / "report.html").is_file():
            return cand
    raise FileNotFoundError("reportgen templates not found (broken installation)")


def _pct(v, digits: int = 1) -> str:
    v = value(v)  # a metric dict shows its value here; `metric` shows its interval and n too
    return "–" if v is None else f"{100 * v:.{digits}f}%"


def _num(v, digits: int = 2) -> str:
    v = value(v)
    if v is None:
        return "–"
    if isinstance(v, int):
        return f"{v:,}"
    return f"{v:.{digits}f}"


def _metric(m, kind: str = "num"):
    """A metric with its 95% interval and n, as markup: value, then a smaller "[lo, hi] (n=…)" (a bare number
    from an older report.json shows alone)."""
    import markupsafe

    from .stats import fmt

    if value(m) is None:
        return "–"
    v = fmt(value(m), kind)
    rest = fmt(m, kind)[len(v):].strip()  # "[lo, hi] (n=…)"
    out = markupsafe.Markup('<span class="mv">{}</span>').format(v)
    if rest:
        out += markupsafe.Markup(' <span class="ci">{}</span>').format(rest)
    return out


@lru_cache(maxsize=4096)
def _tok(s: str):
    """A token for the page: whitespace made visible, characters no font draws as code-point boxes (Markup)."""
    from .text import html, show_token

    return html(show_token(s))


HEAT_LEVELS = 8


def _ctx(x: dict, peak: float) -> str:
    """One context of a feature card as compact HTML (a str, for `_card_contexts` to join): `<div class="ctx"
    data-o=FLAT>` holding the activation, then the tokens. Neighbours that do not fire and show as one character each are one text run
    (the page's script splits it per character on hover); every other token is an `<i>`: a firing one
    `<i class="hN" data-a=A>` (N: heat level), the activating token framed. With an "ablation" list, a second
    line shades each token by the loss change of ablating the feature (red: the loss rises without it)."""
    texts = [_tok_plain(t) for t in x["t"]]
    at = x["at"]
    out = [f'<div class="ctx" data-o="{x.get("o", "")}"><b>{_num(x["activation"], 2)}</b>']  # digits: nothing to escape
    put = out.append
    scale = HEAT_LEVELS / peak if peak else 0.0
    for i, ((text, one), a) in enumerate(zip(texts, x["a"])):
        if not a and i != at:  # the common case: a token where the feature does not fire
            put(text if one else f"<i>{text}</i>")
            continue
        lvl = max(1, min(HEAT_LEVELS, round(scale * a))) if scale and a > 0 else 0
        cls = (f"h{lvl} at" if lvl else "at") if i == at else f"h{lvl}" if lvl else ""
        attr = f' data-a="{a:.3g}"' if a else ""
        put(f'<i class="{cls}"{attr}>{text}</i>' if cls else f"<i{attr}>{text}</i>")
    put("</div>")
    if x.get("ablation"):
        d = [e for e in x["ablation"] if e is not None]
        worst = max(d, key=abs) if d else 0.0
        scale = max(abs(worst), 1e-9)
        put(f'<div class="ctx abl"><b>{"+" if worst >= 0 else ""}{worst:.2f}</b>')
        for (text, one), e in zip(texts, x["ablation"]):
            if e is None or abs(e) < 0.05 * scale:
                put(text if one else f"<i>{text}</i>")
            else:
                put(f'<i class="{"up" if e > 0 else "dn"}{max(1, min(4, round(4 * abs(e) / scale)))}" data-d="{e:+.2g}">{text}</i>')
        put("</div>")
    return "".join(out)


def _card_contexts(f: dict, on_paper: bool = False) -> str:
    """A feature card's contexts as HTML (Markup): its top ones, then one group per quantile interval, highest
    first, under a line naming the interval's range. On paper: the top 4 and one per interval."""
    from markupsafe import Markup

    peak = f["max_activation"]
    parts = [_ctx(x, peak) for x in (f["examples"][:4] if on_paper else f["examples"])]
    first = True
    for iv in reversed(f["intervals"]):
        if not iv["examples"]:
            continue
        share = f" · each interval {_pct(iv['share'], 0)} of firings" if first else ""
        parts.append(f'<div class="ivl">{_num(iv["lo"], 2)}–{_num(iv["hi"], 2)}{share}</div>')
        parts.extend(_ctx(x, peak) for x in (iv["examples"][:1] if on_paper else iv["examples"]))
        first = False
    return Markup("\n".join(parts))


def _logit_rows(f: dict) -> str:
    """A feature card's logit table body (Markup): per row the token it raises most and the one it lowers most,
    each with its logit change, down the longer of the two lists."""
    from itertools import zip_longest

    from markupsafe import Markup

    cell = lambda e: f"<b>{_tok(e['token'])}</b> {e['value']:.2f}" if e else ""  # noqa: E731
    return Markup("".join(f"<tr><td>{cell(p)}</td><td>{cell(n)}</td></tr>\n"
                          for p, n in zip_longest(f["logits_pos"], f["logits_neg"])))


def _index_rows(rows: list, prefix: str = "") -> str:
    """The feature index's table rows (Markup): id (linked to its card where it has one), density, max, mean
    and top token; a dense feature's row marked."""
    from markupsafe import Markup, escape

    p = escape(prefix)
    out = []
    for r in rows:
        i = int(r["id"])
        cell = f'<a href="#{p}feature-{i}">{i}</a>' if r["card"] else str(i)
        dense = ' class="dense"' if r["dense"] else ""
        out.append(f'<tr id="{p}f{i}"{dense}><td>{cell}</td><td>{_pct(r["density"], 2)}'
                   f'</td><td>{_num(r["max"], 2)}</td><td>{_num(r["mean"], 3)}</td><td class="tk">{_tok(r["top"])}</td></tr>\n')
    return Markup("".join(out))


@lru_cache(maxsize=16384)
def _tok_plain(s: str) -> tuple[str, bool]:
    """(the token's HTML, whether it shows as exactly one character: such tokens may stand in a text run)."""
    from .text import show_token

    h = str(_tok(s))
    return h, len(show_token(s)) == 1 and "<" not in h


def _bars(counts: list, width: int = 200, height: int = 36, color: str = "#0969da", marks: list = ()) -> str:
    """A small bar chart as an SVG data: URI (one image per card: WeasyPrint lays out one box, not one per bar):
    the bars as one path, `marks` (fractions of the width) as dashed red lines."""
    from urllib.parse import quote

    peak = max(counts) if counts else 0
    w = width / max(len(counts), 1)
    path = "".join(f"M{i * w + 0.5:.1f} {height}v-{height * c / peak:.1f}h{w - 1:.1f}V{height}z"
                   for i, c in enumerate(counts) if peak and c)
    ticks = "".join(f"M{m * width:.1f} 0V{height}" for m in marks)
    svg = (f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height + 1}' viewBox='0 0 {width} {height + 1}'>"
           f"<path fill='{color}' d='{path}'/>"
           + (f"<path stroke='#cf222e' stroke-width='.8' stroke-dasharray='2 1.5' d='{ticks}'/>" if ticks else "")
           + f"<path stroke='#1f2328' d='M0 {height + 0.5}H{width}'/></svg>")
    return "data:image/svg+xml," + quote(svg, safe=" /='.:-,")


_OVERRIDE: list = [None]  # --templates DIR: templates that replace the shipped ones, file by file


def set_templates(folder: str | None) -> None:
    """Use the templates in `folder` before the shipped ones (--templates)."""
    _OVERRIDE[0] = str(folder) if folder else None


def plugin_template_dirs() -> list[str]:
    """templates/ folders beside analyses that come from other packages (their partials/<NAME>.html)."""
    import analyses

    dirs = []
    for mod in analyses.REGISTRY.values():
        if mod.__name__.split(".")[0] != "analyses" and getattr(mod, "__file__", None):
            d = Path(mod.__file__).resolve().parent / "templates"
            if d.is_dir() and str(d) not in dirs:
                dirs.append(str(d))
    return dirs


def environment():
    return _environment(_OVERRIDE[0])


@lru_cache(maxsize=4)
def _environment(override: str | None):
    import jinja2

    paths = ([override] if override else []) + [str(templates_dir())] + plugin_template_dirs()
    settings = {"autoescape": True, "undefined": jinja2.StrictUndefined, "trim_blocks": True, "lstrip_blocks": True,
                "keep_trailing_newline": True}
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(paths), bytecode_cache=_bytecode_cache(settings), **settings)
    env.filters["pct"] = _pct
    env.filters["num"] = _num
    env.filters["metric"] = _metric
    env.filters["tok"] = _tok
    env.filters["bars"] = _bars
    env.filters["card_contexts"] = _card_contexts
    env.filters["logit_rows"] = _logit_rows
    env.filters["index_rows"] = _index_rows
    return env


def _bytecode_cache(settings: dict):
    """Jinja's cache of compiled templates, in its own per-user folder under the temporary directory (created
    private, 0700, and checked to be the user's by Jinja): compiling the SAE report's templates took 0.06 s
    of every build. An entry is used only for the same template file with the same source (Jinja checks),
    and its name carries the reportgen and Jinja versions and these settings, which the compiled code depends
    on. None (compile every time) where that folder cannot be made or is not safe."""
    import hashlib

    import jinja2

    from ._version import __version__

    class Cache(jinja2.FileSystemBytecodeCache):
        """A cache that never fails a build: an entry that cannot be read is compiled again, one that cannot be
        written (a full disk) is not kept."""

        def load_bytecode(self, bucket):
            try:
                super().load_bytecode(bucket)
            except Exception:  # noqa: BLE001
                bucket.reset()

        def dump_bytecode(self, bucket):
            try:
                super().dump_bytecode(bucket)
            except OSError:
                pass

    tag = hashlib.sha256(repr((__version__, jinja2.__version__, sorted((k, repr(v)) for k, v in settings.items())))
                         .encode()).hexdigest()[:16]
    try:
        return Cache(pattern=f"__reportgen_{tag}_%s.cache")
    except (OSError, RuntimeError):
        return None


def render(template: str, **context) -> str:
    return environment().get_template(template).render(**context)


def source_date() -> str | None:
    """ISO date-time from SOURCE_DATE_EPOCH, for reproducible PDF metadata; None when unset."""
    import datetime

    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if not epoch:
        return None
    return datetime.datetime.fromtimestamp(int(epoch), datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def inline_images(html: str, base_dir: Path) -> str:
    """Replace `src="figures/….png|svg"` by data: URIs read from base_dir. Used for the PDF (WeasyPrint names
    embedded images by their URL, and the report is written in a temporary folder: inlined, the PDF depends
    on image content only) and for --self-contained pages (nothing outside the file)."""
    import base64
    import re

    mime = {"png": "image/png", "svg": "image/svg+xml"}

    def data_uri(m) -> str:
        data = base64.b64encode((base_dir / m.group(1)).read_bytes()).decode()
        return f'src="data:{mime[m.group(2)]};base64,{data}"'

    return re.sub(r'src="(figures/[^"/]+\.(png|svg))"', data_uri, html)


def write_pdf(html: str, base_dir: Path, path: Path) -> None:
    """PDF of an HTML page whose figure PNGs lie under base_dir."""
    import logging

    import weasyprint

    from .pdf import fixed_font_times

    logging.getLogger("weasyprint").setLevel(logging.ERROR)
    logging.getLogger("fontTools").setLevel(logging.ERROR)
    fixed_font_times()  # the same font bytes whichever subsetter WeasyPrint uses
    html = inline_images(html, base_dir)
    weasyprint.HTML(string=html, base_url=str(base_dir) + os.sep).write_pdf(str(path))


def _warm_up_pdf() -> None:
    import io

    import weasyprint

    from .figures import Canvas

    png = "data:image/png;base64," + __import__("base64").b64encode(Canvas(8, 8).png()).decode()
    page = render("base.html", pdf_date=None).replace(
        "</main>", f'<h1>x</h1><h2>y</h2><p>z <code>c</code></p><table><caption>t</caption><tr><th>a</th><td>1</td></tr>'
                   f'</table><figure><img src="{png}" width="8" height="8"><figcaption>f</figcaption></figure></main>')
    weasyprint.HTML(string=page).write_pdf(io.BytesIO())


def _serve() -> None:
    """Worker main loop (`python -m reportgen.render`): pickled jobs on stdin, pickled results on stdout.
    A reader thread takes jobs off the pipe as they come, so the parent never blocks while sending."""
    import pickle
    import queue
    import signal
    import threading
    import time

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the parent decides
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # whatever a library prints goes to stderr, never into the result stream
    sys.stdout = sys.stderr
    jobs: queue.Queue = queue.Queue()

    def read() -> None:
        while True:
            try:
                jobs.put(pickle.load(sys.stdin.buffer))
            except (EOFError, OSError):
                jobs.put(None)
                return

    threading.Thread(target=read, daemon=True).start()
    import weasyprint  # noqa: F401  (imported while the parent loads and runs the model)

    # Warm-up while the parent is still busy: the first PDF a process makes pays for font loading, cffi
    # type parsing and stylesheet set-up; done here, the reports' own PDFs do not.
    _warm_up_pdf()
    while (job := jobs.get()) is not None:
        t0 = time.perf_counter()
        try:
            write_pdf(*job)
            result = ("ok", time.perf_counter() - t0)
        except Exception as e:  # noqa: BLE001 - reported to the parent, which raises
            result = ("error", f"{type(e).__name__}: {e}")
        pickle.dump(result, out)
        out.flush()


class RenderWorker:
    """A second process for the PDF layout: it imports WeasyPrint while the parent loads and runs the
    model, then lays out one report's PDF while the parent writes that report's SVGs, data and HTML and
    goes on to the next checkpoint. Jobs run in the order sent; each has a number (`sent` counts them),
    and `wait(upto)` collects the results of the jobs before `upto`, so the parent can collect one report
    while the worker is already busy with the next.

    A plain subprocess, not multiprocessing: spawn would re-import the caller's __main__ module (a
    training script calling reportgen.build), and fork would copy a process holding torch's threads."""

    def __init__(self):
        import subprocess

        self._proc = subprocess.Popen([sys.executable, "-m", "reportgen.render"], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE)
        self.sent = 0
        self._results: list[tuple[str, object]] = []  # (status, seconds or error) of each job, in order

    def _send(self, job: tuple) -> None:
        import pickle

        from .errors import ReportgenError

        try:
            pickle.dump(job, self._proc.stdin)
            self._proc.stdin.flush()
        except (BrokenPipeError, OSError):
            raise ReportgenError("the render worker process died (use --format html to skip the PDF)") from None
        self.sent += 1

    def write_pdf(self, html: str, base_dir: Path, path: Path) -> None:
        """PDF of an HTML page whose figure PNGs lie under base_dir (and are written before this is sent)."""
        self._send((html, Path(base_dir), Path(path)))

    def wait(self, upto: int | None = None, since: int = 0) -> float:
        """Block until the jobs before number `upto` (all sent, by default) are done; raise the first
        failure among jobs since..upto, else return the worker's time on them."""
        import pickle

        from .errors import ReportgenError

        upto = self.sent if upto is None else upto
        while len(self._results) < upto:
            try:
                self._results.append(pickle.load(self._proc.stdout))
            except (EOFError, OSError, pickle.UnpicklingError):
                raise ReportgenError("the render worker process died (use --format html to skip the PDF)") from None
        mine = self._results[since:upto]
        error = next((value for status, value in mine if status != "ok"), None)
        if error is not None:
            raise ReportgenError(f"rendering failed: {error}")
        return sum(value for _, value in mine)

    def close(self, kill: bool = False) -> None:
        """Wait for the jobs sent, then end the process; `kill`: end it now (the build was interrupted)."""
        if kill:
            self._proc.kill()
            self._proc.wait()
            return
        try:
            self.wait()
        except Exception:  # noqa: BLE001 - closing after a failure: the first error was already raised
            pass
        try:
            self._proc.stdin.close()
            self._proc.wait(timeout=10)
        except Exception:  # noqa: BLE001
            self._proc.kill()


if __name__ == "__main__":
    _serve()
