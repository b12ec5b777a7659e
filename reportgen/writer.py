"""The only writer of a report folder: figures, data, HTML and PDF into a staged folder, swapped in for the
report once its PDF is laid out (an interrupted or failed build never leaves a half-written report)."""
from __future__ import annotations

import json
from pathlib import Path

from .log import log


class PendingReport:
    """A report written into its staged folder whose PDF the render worker may still be laying out."""

    def __init__(self, staged, opts, timer, worker, jobs: tuple[int, int]):
        """jobs: the numbers (first, end) of this report's jobs on the worker."""
        self.staged, self.opts, self.timer, self.worker, self.jobs = staged, opts, timer, worker, jobs
        self.done = False

    def finish(self) -> Path:
        """Wait for the PDF, then install the report; on failure the staged folder is removed."""
        if not self.done:
            self.done = True
            try:
                if self.worker is not None:
                    with self.timer("pdf"):
                        t = self.worker.wait(upto=self.jobs[1], since=self.jobs[0])
                    self.timer.phases["worker"] = self.timer.phases.get("worker", 0.0) + t
            except BaseException:
                self.staged.abort()
                raise
            self.staged.commit()
            log(self.opts, f"  wrote {self.staged.final}")
        return self.staged.final

    def abort(self) -> None:
        self.done = True
        self.staged.abort()


def write_report(job, opts, gathered, timer, worker=None) -> PendingReport:
    """Figures, data, HTML and PDF into a temporary folder; the returned PendingReport swaps it in for
    `job.final` once the PDF is written."""
    import shutil

    from .figures import display_size, save
    from .render import inline_images, render, source_date
    from .site import REPORT_META, Staged

    final, key = job.final, job.key
    meta, ctx, trace, sections = gathered.meta, gathered.context, gathered.trace, gathered.sections
    fig_no = 0
    for n, s in enumerate(sections, 1):
        for k, f in enumerate(s["figures"], 1):
            fig_no += 1
            f.number, f.stem = fig_no, f"{n:02d}-{s['name']}-{k}"
    figs = [f for s in sections for f in s["figures"]]
    staged = Staged(final)
    tmp = staged.tmp
    first_job = worker.sent if worker is not None else 0  # the numbers of this report's worker jobs
    try:
        (tmp / "figures").mkdir()
        (tmp / "data").mkdir()
        with timer("figures"):  # PNGs first: the PDF needs only them, and starts while the rest is written
            vector = ("svg", "pdf") if "pdf" in opts.figure_formats else ("svg",)  # pdf: for LaTeX, TrueType fonts
            for f in figs:
                f.files = {fmt: f"figures/{f.stem}.{fmt}" for fmt in ("svg", "png", *vector[1:])}
                f.width, f.height = display_size(f.drawing)
            for f in figs:
                save(f, tmp / "figures" / f.stem, ("png",), dpi=opts.dpi)
        evalset = getattr(trace, "eval", None)  # TRM: the evaluation set's compact arrays
        meta["files"] = sorted(report_files(opts, sections) + (["data/eval.npz"] if evalset is not None else [])) + (
            sorted(f"{name}/{p.name}" for name, d in gathered.extra_dirs.items() for p in d.iterdir() if p.is_file()))
        meta["cache_key"] = key
        for name, d in gathered.extra_dirs.items():  # e.g. the SAE trained for this report
            shutil.copytree(d, tmp / name)
            shutil.rmtree(d, ignore_errors=True)
        if worker is not None:
            with timer("html"):  # queued behind the chart PNGs; the worker inlines the PNGs, then lays out
                png = {f.stem: f.files["png"] for f in figs}
                worker.write_pdf(render("report.html", src=png, links=False, pdf_date=source_date(), **ctx), tmp,
                                 tmp / "report.pdf")
        with timer("figures"):
            for f in figs:
                save(f, tmp / "figures" / f.stem, vector)
        with timer("analyses"):
            trace.save(tmp / "data" / "trace.npz")
            if evalset is not None:
                evalset.save(tmp / "data" / "eval.npz")
            for s in sections:
                (tmp / "data" / f"{s['name']}.json").write_text(data_json(s["data"]))
            (tmp / REPORT_META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        with timer("html"):
            # the page script (templates/report.js) only where an analysis has something interactive (SCRIPT)
            script = any(getattr(s.get("module"), "SCRIPT", False) for s in sections)
            if "html" in opts.formats:
                svg = {f.stem: f.files["svg"] for f in figs}
                (tmp / "index.html").write_text(render("report.html", src=svg, links=True, script=script, **ctx), encoding="utf-8")
            if opts.self_contained:  # one file, no reference outside it: figures as data: URIs, no file links
                page = render("report.html", src={f.stem: f.files["svg"] for f in figs}, links=False, script=script, **ctx)
                (tmp / "report.html").write_text(inline_images(page, tmp), encoding="utf-8")
    except BaseException as e:
        # the worker may still be writing into the staged folder; after Ctrl-C the caller kills it instead
        # of waiting (a folder it then leaves is removed by the next build's recover())
        if worker is not None and not isinstance(e, KeyboardInterrupt):
            try:
                worker.wait()
            except Exception:  # noqa: BLE001
                pass
        staged.abort()
        raise
    return PendingReport(staged, opts, timer, worker, (first_job, worker.sent if worker is not None else 0))


def data_json(data) -> str:
    """An analysis's data as JSON text: indented when small (to read and diff), else compact, which Python's
    C encoder writes many times faster than indented text (an SAE section's cards hold ~10^5 values). A list
    or dict that the data holds more than once near its top (an SAE section repeats its first SAE's block,
    cards included, at the top level) is encoded once; the text is the same."""
    text = _compact(data)
    if len(text) <= 1 << 16:
        text = json.dumps(data, indent=1, allow_nan=False, default=_json_default)
    return text + "\n"


def _compact(data, depth: int = 3) -> str:
    """json.dumps(data) with compact separators, where a container met again within `depth` levels reuses
    the text written for it the first time."""
    dumps = lambda o: json.dumps(o, separators=(",", ":"), allow_nan=False, default=_json_default)  # noqa: E731
    seen: dict[int, int] = {}

    def walk(o, d):
        if isinstance(o, (dict, list)):
            seen[id(o)] = seen.get(id(o), 0) + 1
            if d and seen[id(o)] == 1:
                for v in (o.values() if isinstance(o, dict) else o):
                    walk(v, d - 1)
    walk(data, depth)
    shared = {i for i, n in seen.items() if n > 1}
    if not shared:
        return dumps(data)
    holds: dict[int, bool] = {}  # whether a container holds a shared one within the walked levels

    def has(o, d) -> bool:
        if not isinstance(o, (dict, list)):
            return False
        if id(o) not in holds:
            holds[id(o)] = id(o) in shared or bool(d) and any(has(v, d - 1) for v in (
                o.values() if isinstance(o, dict) else o))
        return holds[id(o)]
    memo: dict[int, str] = {}

    def enc(o, d) -> str:
        if id(o) in memo:
            return memo[id(o)]
        if d and has(o, d) and (isinstance(o, list) or all(isinstance(k, str) for k in o)):
            if isinstance(o, dict):
                text = "{" + ",".join(dumps(k) + ":" + enc(v, d - 1) for k, v in o.items()) + "}"
            else:
                text = "[" + ",".join(enc(v, d - 1) for v in o) + "]"
        else:
            text = dumps(o)
        if id(o) in shared:
            memo[id(o)] = text
        return text
    return enc(data, depth)


def _json_default(o):
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def report_files(opts, sections: list) -> list[str]:
    """Every file a report folder holds (its figure files must be assigned first)."""
    files = ["data/trace.npz"] + [f"data/{s['name']}.json" for s in sections]
    files += [p for s in sections for f in s["figures"] for p in f.files.values()]
    if "html" in opts.formats:
        files.append("index.html")
    if "pdf" in opts.formats:
        files.append("report.pdf")
    if opts.self_contained:
        files.append("report.html")
    return sorted(files)
