"""Jinja environment (templates shipped in the package or in a checkout) and the PDF writer."""
from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path


def templates_dir() -> Path:
    """templates/ beside the package in a checkout, or reportgen/templates in a wheel."""
    here = Path(__file__).resolve().parent
    for cand in (here / "templates", here.parent / "templates"):
        if (cand / "report.html").is_file():
            return cand
    raise FileNotFoundError("reportgen templates not found (broken installation)")


def _pct(v, digits: int = 1) -> str:
    return "–" if v is None else f"{100 * v:.{digits}f}%"


def _num(v, digits: int = 2) -> str:
    if v is None:
        return "–"
    if isinstance(v, int):
        return f"{v:,}"
    return f"{v:.{digits}f}"


@lru_cache(maxsize=1)
def environment():
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates_dir())),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters["pct"] = _pct
    env.filters["num"] = _num
    return env


def render(template: str, **context) -> str:
    return environment().get_template(template).render(**context)


def source_date() -> str | None:
    """ISO date-time from SOURCE_DATE_EPOCH, for reproducible PDF metadata; None when unset."""
    import datetime

    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if not epoch:
        return None
    return datetime.datetime.fromtimestamp(int(epoch), datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def write_pdf(html: str, base_dir: Path, path: Path) -> None:
    """PDF of an HTML page whose relative links resolve against base_dir."""
    import logging

    import weasyprint

    logging.getLogger("weasyprint").setLevel(logging.ERROR)
    logging.getLogger("fontTools").setLevel(logging.ERROR)
    weasyprint.HTML(string=html, base_url=str(base_dir) + os.sep).write_pdf(str(path))


def _pdf_worker(conn) -> None:
    import time

    import weasyprint  # noqa: F401  (imported while the parent loads and runs the model)

    while True:
        job = conn.recv()
        if job is None:
            return
        t0 = time.perf_counter()
        try:
            write_pdf(job[0], Path(job[1]), Path(job[2]))
            conn.send(("ok", time.perf_counter() - t0))
        except Exception as e:  # noqa: BLE001 - reported to the parent, which raises
            conn.send(("error", f"{type(e).__name__}: {e}"))


class PdfWorker:
    """WeasyPrint in its own process: started before the model work so its import runs on the other
    core, then each report's PDF is laid out while the parent writes SVGs, data and HTML."""

    def __init__(self):
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")  # no fork of a process holding torch threads
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_pdf_worker, args=(child,), daemon=True, name="reportgen-pdf")
        self._proc.start()
        child.close()
        self._busy = False

    def submit(self, html: str, base_dir: Path, path: Path) -> None:
        self._conn.send((html, str(base_dir), str(path)))
        self._busy = True

    def wait(self) -> float:
        """Block until the submitted PDF is written; returns the worker's time on it."""
        from .errors import ReportgenError

        self._busy = False
        try:
            status, value = self._conn.recv()
        except (EOFError, OSError):
            raise ReportgenError("the PDF renderer process died (use --format html to skip the PDF)") from None
        if status != "ok":
            raise ReportgenError(f"PDF rendering failed: {value}")
        return value

    def close(self) -> None:
        try:
            if self._busy:
                self._conn.recv()
            self._conn.send(None)
        except (EOFError, OSError, BrokenPipeError):
            pass
        self._proc.join(timeout=10)
        if self._proc.is_alive():
            self._proc.kill()
