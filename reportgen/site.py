"""The output folder: atomic report installs, the site index, manifest.json and .nojekyll.

Layout (stable, linked to by users):
    <out>/index.html  manifest.json  .nojekyll
    <out>/<run>/<step>/index.html, report.pdf, figures/, data/ (data/report.json describes the report)
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

REPORT_META = Path("data") / "report.json"


def public_mode(path: Path) -> None:
    """Give a file or folder made private by tempfile (0600 / 0700) the mode open() and mkdir() give under the
    umask (0644 / 0755 under the usual 022), so a web server running as another user can read the site."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def temp_name(name: str) -> str:
    """A temporary name beside `name` that no concurrent build (another process, another host) shares."""
    return f".{name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        public_mode(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class Staged:
    """A temporary folder beside `final` that `commit` swaps in for it (the old report is replaced in one
    atomic step where the OS allows) and `abort` deletes, leaving `final` untouched."""

    def __init__(self, final: Path):
        final.parent.mkdir(parents=True, exist_ok=True)
        recover(final)
        self.final = final
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-{os.getpid()}-", dir=final.parent))
        public_mode(self.tmp)  # mkdtemp makes it private; a published report must be readable

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def commit(self) -> None:
        final, tmp = self.final, self.tmp
        if final.exists() and _exchange(tmp, final):  # one atomic step: at no moment is there no report
            shutil.rmtree(tmp, ignore_errors=True)  # it now holds the old report
            return
        old = None
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


@contextmanager
def staged_report(final: Path):
    """Yield a temporary folder beside `final`; on success it replaces `final`, on failure it is deleted."""
    st = Staged(final)
    try:
        yield st.tmp
    except BaseException:
        st.abort()
        raise
    st.commit()


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where that is not available."""
    import ctypes

    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return fn(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), rename_exchange) == 0


def recover(final: Path) -> None:
    """Clean up after a build of `final` that was killed: drop its staging folders, and put back the old
    report if the kill fell between the two renames of the fallback swap."""
    for p in final.parent.glob(f".{final.name}.tmp-*"):
        shutil.rmtree(p, ignore_errors=True)
    for p in sorted(final.parent.glob(f".{final.name}.old-*")):
        if not final.exists():
            os.replace(p, final)
        else:
            shutil.rmtree(p, ignore_errors=True)


def collect_reports(out: Path) -> list[dict]:
    """report.json of every report under out, ordered by run and step."""
    reports = []
    for meta in sorted(out.glob(f"*/*/{REPORT_META.as_posix()}")):
        if any(part.startswith(".") for part in meta.relative_to(out).parts):
            continue
        try:
            reports.append(json.loads(meta.read_text()))
        except (OSError, ValueError):
            continue  # a foreign or damaged folder is not listed, never fatal
    return sorted(reports, key=lambda r: (r["run"], r["step"] if r["step"] is not None else -1, r["name"]))


# headline metrics in the order and wording of the index page and summary.md
METRIC_LABELS = {
    "blank_accuracy": ("blank-cell acc.", "pct"),
    "exact_solve_rate": ("exact solve", "pct"),
    "mean_steps_to_first_correct": ("steps to solve", "num"),
    "halt_precision": ("halt precision", "pct"),
    "halt_recall": ("halt recall", "pct"),
    "z_L_lens_accuracy": ("z_L lens acc.", "pct"),
    "z_H_settling": ("z_H change, last", "num"),
    "violations_last_step": ("rule violations", "num"),
    "loss": ("loss (nats)", "num"),
    "masked_accuracy": ("masked acc.", "pct"),
    "next_token_accuracy": ("next-token acc.", "pct"),
    "attention_entropy": ("attn. entropy", "num"),
    "sae_l0": ("SAE L0", "num"),
    "sae_explained_variance": ("SAE expl. var.", "pct"),
}


def metric_keys(runs: dict[str, list[dict]]) -> list[str]:
    return [k for k in METRIC_LABELS if any(k in r["metrics"] for rs in runs.values() for r in rs)]


def summary_markdown(runs: dict[str, list[dict]]) -> str:
    """Markdown tables of every report's headline metrics, one per run with that run's metrics (fit for
    $GITHUB_STEP_SUMMARY); each cell is the value, its 95% interval and n."""
    from .stats import fmt

    parts = ["Each metric: value [95% interval] (n), Wilson for proportions, bootstrap for means.\n"]
    for run, reports in runs.items():
        keys = metric_keys({run: reports})
        lines = [f"### {run}", "", "| checkpoint | " + " | ".join(METRIC_LABELS[k][0] for k in keys) + " |",
                 "| --- | " + " | ".join("---:" for _ in keys) + " |"]
        for r in reports:
            cells = [fmt(r["metrics"].get(k), METRIC_LABELS[k][1]) for k in keys]  # value [95% interval] (n=…)
            lines.append(f"| [{r['name']}]({r['path']}index.html) | " + " | ".join(cells) + " |")
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)


def _plot_metric(ax, steps: list, reports: list[dict], key: str, **kw) -> bool:
    """One metric across checkpoints, with its 95% band (figures.metric_line)."""
    from .figures import metric_line

    return metric_line(ax, steps, [r["metrics"].get(key) for r in reports], **kw)


def trend_figure(reports: list[dict]):
    """Headline metrics across training steps (matplotlib), or None when no report has a step and metrics."""
    from .figures import ACCENT, BAD, GOOD, MUTED, Figure, mpl_figure
    from .stats import value

    pts = [r for r in reports if r["step"] is not None and r["metrics"]]
    if not pts:
        return None
    steps = [r["step"] for r in pts]
    if not any("blank_accuracy" in r["metrics"] for r in pts):
        return _lm_trend_figure(pts, steps)
    fig, ax = mpl_figure(1, 2, (6.6, 2.5))
    a, b = ax[0]
    colours = {"blank_accuracy": ACCENT, "exact_solve_rate": GOOD, "halt_precision": MUTED, "halt_recall": BAD}
    for k, colour in colours.items():
        _plot_metric(a, steps, pts, k, marker="o", ms=3, color=colour,
                     ls="-" if k in ("blank_accuracy", "exact_solve_rate") else ":", label=METRIC_LABELS[k][0])
    a.set(xlabel="training step", ylabel="fraction", ylim=(-0.02, 1.02), title="(a) accuracy and halting")
    a.legend(loc="best")
    _plot_metric(b, steps, pts, "mean_steps_to_first_correct", marker="s", ms=3, color=ACCENT)
    tops = [m.get("hi") if isinstance(m, dict) and m.get("hi") is not None else value(m)
            for m in (r["metrics"].get("mean_steps_to_first_correct") for r in pts)]
    b.set(xlabel="training step", ylabel="ACT steps", title="(b) mean steps to the first correct board",
          ylim=(0, 1.15 * max([v for v in tops if v is not None], default=1)),  # from 0: a flat line reads as flat
          xlim=a.get_xlim())  # the same steps as (a), also where no puzzle was solved yet
    return Figure("trend-metrics", (
        "Headline metrics of each checkpoint's report against its training step, over the evaluation puzzles each "
        "report ran (after the last ACT step); bands: 95% intervals (Wilson for the fractions, bootstrap over the "
        "solved puzzles for the mean steps). Dotted: halting precision and recall of q_halt > 0; gaps: no puzzle in "
        "the denominator, or none solved."), fig, alt="Metrics across training steps")


def write_run_overview(out: Path, run: str, reports: list[dict], version: str, pdf: bool = False, worker=None,
                       dpi: int | None = None) -> None:
    """<run>/index.html (and overview.pdf): every checkpoint's metrics, their trend, and the analyses' run figures."""
    import analyses

    from .figures import display_size, save
    from .render import render

    folder = out / run
    figs = []
    trend = trend_figure(reports)
    if trend is not None:
        figs.append(trend)
    for mod in analyses.REGISTRY.values():
        if not hasattr(mod, "run_figure"):
            continue
        items = []
        for r in reports:
            try:
                items.append((r["name"], json.loads((out / r["path"] / "data" / f"{mod.NAME}.json").read_text())))
            except (OSError, ValueError):
                continue  # that report did not run this analysis
        f = mod.run_figure(items) if len(items) == len(reports) else None
        if f is not None:
            figs.append(f)
    (folder / "figures").mkdir(exist_ok=True)
    (folder / "data").mkdir(exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=temp_name("figures"), dir=folder))
    try:  # each figure file is drawn beside its place and renamed into it: a reader never sees half a file
        for n, f in enumerate(figs, 1):
            f.number, f.stem = n, f.key
            written = save(f, staging / f.stem, ("svg", "png"), **({"dpi": dpi} if dpi else {}))
            f.files = {}
            for fmt, p in written.items():
                os.replace(p, folder / "figures" / p.name)
                f.files[fmt] = f"figures/{p.name}"
            f.width, f.height = display_size(f.drawing)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    rows = [{"name": r["name"], "step": r["step"], "path": r["name"] + "/", "metrics": r["metrics"],
             "files": r["files"]} for r in reports]
    write_atomic(folder / "data" / "overview.json", json.dumps({"run": run, "reports": rows}, indent=1, sort_keys=True) + "\n")
    runs = {run: reports}
    ctx = dict(run=run, rows=rows, figures=figs, version=version, columns=[(k, *METRIC_LABELS[k]) for k in metric_keys(runs)])
    write_atomic(folder / "index.html", render("run.html", src={f.stem: f.files["svg"] for f in figs}, links=True,
                                               has_pdf=pdf, **ctx))
    if pdf:
        from .render import source_date, write_pdf

        tmp = folder / temp_name("overview.pdf")
        page = render("run.html", src={f.stem: f.files["png"] for f in figs}, links=False, has_pdf=False,
                      pdf_date=source_date(), **ctx)
        try:
            if worker is not None:  # a RenderWorker: WeasyPrint is already imported and warm there
                worker.write_pdf(page, folder, tmp)
                worker.wait()
            else:
                write_pdf(page, folder, tmp)
            tmp.replace(folder / "overview.pdf")
        finally:
            tmp.unlink(missing_ok=True)
    elif (folder / "overview.pdf").exists():  # an older overview's PDF would show stale metrics
        (folder / "overview.pdf").unlink()


def write_site(out: Path, version: str, changed_runs: set[str] | None = None, pdf: bool = False, worker=None,
               dpi: int | None = None) -> None:
    """The site index, manifest, summary, 404 and .nojekyll; the overview of every run in `changed_runs`
    (all runs when None) and of every run that has none yet. `worker`: a RenderWorker for the overviews' PDFs."""
    from .render import render

    reports = collect_reports(out)
    manifest = {"generator": f"reportgen {version}", "reports": reports}
    write_atomic(out / "manifest.json", json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    runs: dict[str, list[dict]] = {}
    for r in reports:
        runs.setdefault(r["run"], []).append(r)
    columns = {run: [(k, *METRIC_LABELS[k]) for k in metric_keys({run: rs})] for run, rs in runs.items()}  # per run
    write_atomic(out / "index.html", render("index.html", runs=runs, version=version, n_reports=len(reports),
                                                columns=columns))
    for run, rs in runs.items():
        if changed_runs is None or run in changed_runs or not (out / run / "index.html").is_file():
            write_run_overview(out, run, rs, version, pdf, worker, dpi)
    write_atomic(out / "404.html", render("404.html", version=version))
    write_atomic(out / "summary.md", f"## reportgen: {len(reports)} report(s)\n\n" + summary_markdown(runs))
    (out / ".nojekyll").touch()


def _lm_trend_figure(pts: list[dict], steps: list[int]):
    """Language-model runs: accuracy and SAE explained variance (fractions); loss and attention entropy (nats)."""
    from .stats import value
    from .figures import ACCENT, BAD, GOOD, MUTED, Figure, mpl_figure

    fig, ax = mpl_figure(1, 2, (6.6, 2.5))
    a, b = ax[0]
    for side, keys in ((a, {"masked_accuracy": ACCENT, "next_token_accuracy": ACCENT, "sae_explained_variance": GOOD}),
                       (b, {"loss": BAD, "attention_entropy": MUTED})):
        for k, colour in keys.items():
            _plot_metric(side, steps, pts, k, marker="o", ms=3, color=colour, label=METRIC_LABELS[k][0])
        if side.get_legend_handles_labels()[0]:
            side.legend(loc="best")
    a.set(xlabel="training step", ylabel="fraction", ylim=(-0.02, 1.02), title="(a) accuracy, SAE fit")
    b.set(xlabel="training step", ylabel="nats", title="(b) loss and attention entropy")
    return Figure("trend-metrics", "Headline metrics of each checkpoint's report against its training step, on the "
                  "same evaluation tokens (loss at the scored positions; mean attention entropy over all heads).", fig,
                  alt="Metrics across training steps")
