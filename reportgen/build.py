"""Build orchestration: checkpoint → subject → probe → analyses → figures → HTML/PDF → site.

`run_build` first validates every option, then per checkpoint gathers all data before writing
anything, writes the report into a temporary folder and swaps it in, and finally rewrites the site index.
"""
from __future__ import annotations

import json
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__
from .errors import ReportgenError

FORMATS = ("html", "pdf")
FIGURE_FORMATS = ("svg", "png", "pdf")


@dataclass
class BuildOptions:
    ckpts: list[str]
    out: str = "site"
    data: str | None = None
    split: str = "test"
    samples: int = 5  # puzzles / sequences drawn in the figures (metrics run over --eval)
    eval: str = "all"  # puzzles / sequences the metrics run over: "all" (the whole split, up to the kind's cap) or N
    select: str = "first"
    seed: int = 0
    device: str = "auto"
    dtype: str = "float32"
    only: list[str] | None = None
    formats: list[str] = field(default_factory=lambda: list(FORMATS))
    figure_formats: list[str] = field(default_factory=lambda: ["svg", "png"])  # svg and png are always written
    self_contained: bool = False  # also write report.html with everything inlined
    force: bool = False  # rebuild reports whose inputs have not changed
    jobs: int = 1  # checkpoints built in parallel processes
    executor: str = "none"  # none | slurm | local: one submitit job per checkpoint (cluster.py)
    slurm_partition: str | None = None
    slurm_gpus: int = 0
    slurm_time: int = 60  # minutes
    slurm_cpus: int = 4
    write_index: bool = True  # write the site index (off in the child processes of --jobs)
    config: str | None = None
    params: list[str] = field(default_factory=list)
    threads: int = 0  # torch CPU threads; 0 keeps torch's default
    dpi: int = 200  # PNG resolution of every figure
    max_memory: str = "2GiB"  # budget for activations and batches beyond the model's weights
    quiet: bool = False
    # language-model checkpoints
    vocab: str | None = None  # vocab file, "bytes", or None (vocab.json beside the checkpoint)
    seq_len: int = 0  # tokens per evaluation sequence; 0: min(128, model context)
    max_seqs: int = 256
    mask_rate: float = 0.15  # share of positions masked for a restoration (bidirectional) model
    mask_id: int | None = None  # mask token id when neither the config nor the vocabulary names one
    sae: str | None = None  # SAELens SAE folder
    train_sae: int | None = None  # layer whose resid_post an SAE is trained on (with SAELens)
    sae_arch: str = "topk"
    sae_tokens: int = 200_000
    trust_checkpoint: bool = False  # allow unpickling whole pickled models


class Timer:
    def __init__(self):
        self.phases: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.phases[name] = self.phases.get(name, 0.0) + time.perf_counter() - t0


def _validate(opts: BuildOptions):
    import analyses

    if opts.split not in ("test", "train"):
        raise ReportgenError(f"--split must be test or train, not {opts.split!r}")
    if opts.select not in ("first", "random"):
        raise ReportgenError(f"--select must be first or random, not {opts.select!r}")
    if opts.dtype not in ("float32", "config"):
        raise ReportgenError(f"--dtype must be float32 or config, not {opts.dtype!r}")
    if opts.samples < 1:
        raise ReportgenError(f"--samples must be at least 1, not {opts.samples}")
    eval_count(opts)
    memory_budget(opts)
    if not 50 <= opts.dpi <= 1200:
        raise ReportgenError(f"--dpi must be between 50 and 1200, not {opts.dpi}")
    if opts.mask_id is not None and opts.mask_id < 0:
        raise ReportgenError(f"--mask-id must be a token id >= 0, not {opts.mask_id}")
    if not 0 < opts.mask_rate < 1:
        raise ReportgenError(f"--mask-rate must be between 0 and 1, not {opts.mask_rate}")
    if opts.seq_len < 0 or opts.max_seqs < 1:
        raise ReportgenError("--seq-len must be >= 0 (0: automatic) and --max-seqs >= 1")
    if opts.sae and opts.train_sae is not None:
        raise ReportgenError("pass either --sae DIR or --train-sae LAYER, not both")
    if opts.executor not in ("none", "slurm", "local"):
        raise ReportgenError(f"--executor must be none, slurm or local, not {opts.executor!r}")
    if opts.sae_arch not in ("topk", "standard"):
        raise ReportgenError(f"--sae-arch must be topk or standard, not {opts.sae_arch!r}")
    if opts.sae and not Path(opts.sae).is_dir():
        raise ReportgenError(f"{opts.sae}: SAE folder not found (--sae)")
    bad = [f for f in opts.formats if f not in FORMATS]
    if bad or not opts.formats:
        raise ReportgenError(f"--format takes a list of {', '.join(FORMATS)}, not {','.join(opts.formats)!r}")
    bad = [f for f in opts.figure_formats if f not in FIGURE_FORMATS]
    if bad:
        raise ReportgenError(f"--figure-formats takes a list of {', '.join(FIGURE_FORMATS)}, not {','.join(opts.figure_formats)!r}")
    names = list(analyses.REGISTRY)
    if opts.only:
        unknown = [a for a in opts.only if a not in analyses.REGISTRY]
        if unknown:
            raise ReportgenError(f"--only: unknown analysis {', '.join(unknown)} (known: {', '.join(names)})")
    from .config import analysis_params, read_toml

    toml, toml_path = read_toml(opts.config)
    return analysis_params(analyses.REGISTRY, toml, toml_path, opts.params)


def eval_count(opts: BuildOptions) -> int | None:
    """--eval as a number of puzzles / sequences, or None for "all" (the kind applies its cap)."""
    v = str(opts.eval).strip().lower()
    if v == "all":
        return None
    try:
        n = int(v)
    except ValueError:
        raise ReportgenError(f"--eval takes a number of puzzles/sequences or 'all', not {opts.eval!r}") from None
    if n < 1:
        raise ReportgenError(f"--eval must be at least 1 (or 'all'), not {n}")
    return n


_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "kib": 2**10, "m": 1e6, "mb": 1e6, "mib": 2**20, "g": 1e9, "gb": 1e9,
          "gib": 2**30}


def memory_budget(opts: BuildOptions) -> int:
    """--max-memory in bytes ("2GiB", "1.5GB", "800MiB", a plain number of bytes)."""
    import re

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(opts.max_memory))
    unit = m.group(2).lower() if m else ""
    if not m or unit not in _UNITS:
        raise ReportgenError(f"--max-memory takes a size such as 2GiB, 1500MB or 800MiB, not {opts.max_memory!r}")
    n = int(float(m.group(1)) * _UNITS[unit])
    if n < 64 * 2**20:
        raise ReportgenError(f"--max-memory must be at least 64MiB, not {opts.max_memory!r}")
    return n


def resolve_data(opts: BuildOptions, run_config: dict, ckpt: Path) -> tuple[Path, str]:
    """The dataset folder and how it was found."""
    if opts.data:
        p = Path(opts.data)
        if not p.is_dir():
            raise ReportgenError(f"{p}: dataset folder not found (--data)")
        return p, "--data"
    key = "data_paths_test" if opts.split == "test" and run_config.get("data_paths_test") else "data_paths"
    paths = run_config.get(key) or []
    if not paths:
        raise ReportgenError(f"{ckpt}: no --data given and no all_config.yaml data_paths beside it to find the dataset")
    rel = Path(paths[0])
    if rel.is_dir():  # absolute, or relative to the working directory as upstream resolves it
        return rel, f"all_config.yaml {key}"
    for base in ckpt.resolve().parent.parents:  # a project folder above the checkpoint (upstream layout)
        if (base / rel).is_dir():
            return base / rel, f"all_config.yaml {key}, found under {base}"
    raise ReportgenError(f"{rel}: dataset folder from all_config.yaml {key} not found from the working directory; pass --data")


def _log(opts: BuildOptions, msg: str) -> None:
    if not opts.quiet:
        print(msg, file=sys.stderr, flush=True)


def _progress(opts: BuildOptions, what: str = "ACT step"):
    """Progress on an interactive stderr (a real-size model takes minutes on a CPU)."""
    if opts.quiet or not sys.stderr.isatty():
        return None

    def show(step: int, total: int) -> None:
        print(f"\r  {what} {step}/{total}", end="\n" if step == total else "", file=sys.stderr, flush=True)

    return show


@dataclass
class Job:
    """One checkpoint's build, planned before any heavy import: its inputs and their digest."""

    ref: object  # CheckpointRef
    final: Path  # the report folder
    sha: str
    key: str
    run_config: dict
    config_path: Path | None
    data_dir: Path
    data_how: str
    kind: str = "trm"


def plan(ref, opts: BuildOptions, params: dict, out: Path) -> Job:
    from .checkpoints import read_run_config, read_state_dict, sniff_kind, unknown_checkpoint

    kind = sniff_kind(ref.path)
    if kind == "unknown":
        raise unknown_checkpoint(ref.path)
    if kind == "lm":
        if not opts.data:
            raise ReportgenError(f"{ref.path}: a language-model checkpoint needs --data (a UTF-8 text file, a .npy/.pt "
                                 f"token array or a datasets folder)")
        if not Path(opts.data).exists():
            raise ReportgenError(f"{opts.data}: evaluation data not found (--data)")
        from .lmreport import input_files

        job = Job(ref, out / ref.run / ref.name, ref.sha256, "", {}, None, Path(opts.data), "--data", "lm")
        job.key = cache_key(job.sha, None, job.data_dir, opts, params, input_files(job, opts), kind="lm")
        return job
    try:
        run_config, config_path = read_run_config(ref.path)
        data_dir, data_how = resolve_data(opts, run_config, ref.path)
    except ReportgenError:
        read_state_dict(ref.path)  # an unreadable checkpoint is the problem to report first
        raise
    sha = ref.sha256
    return Job(ref, out / ref.run / ref.name, sha, cache_key(sha, config_path, data_dir, opts, params), run_config,
               config_path, data_dir, data_how)


def run_build(opts: BuildOptions, timer: Timer | None = None) -> list[Path]:
    """Build every checkpoint's report and the site index; returns the report folders.

    Reports whose inputs are unchanged are skipped before torch, matplotlib or WeasyPrint is imported,
    so a rebuild with nothing new costs little more than hashing the inputs."""
    from .checkpoints import discover

    timer = timer or Timer()
    params = _validate(opts)
    refs = discover(opts.ckpts)
    out = Path(opts.out)
    check_out(out)
    folders: list[Path] = []
    todo: list[tuple[int, Job]] = []
    with timer("plan"):
        for i, ref in enumerate(refs, 1):
            job = plan(ref, opts, params, out)
            if job.final.parent.is_dir():
                from .site import recover

                recover(job.final)  # what a killed build of this checkpoint left behind
            if not opts.force and up_to_date(job.final, job.key):
                _log(opts, f"[{i}/{len(refs)}] up to date: {job.final} (inputs unchanged; --force rebuilds)")
                folders.append(job.final)
            else:
                todo.append((i, job))
    if opts.executor != "none" and todo:
        from .cluster import run_executor

        return run_executor(opts, refs, todo, folders, out, timer)
    if opts.jobs > 1 and len(todo) > 1:
        from .cluster import run_parallel

        return run_parallel(opts, refs, todo, folders, out, timer)
    worker = None
    if todo and "pdf" in opts.formats:
        from .render import RenderWorker

        worker = RenderWorker()  # imports WeasyPrint in parallel with torch below
    try:
        if todo:
            with timer("imports"):
                import torch  # the heavy imports, timed apart from the work
                import matplotlib  # noqa: F401
                from matplotlib.figure import Figure  # noqa: F401
            if opts.threads:
                torch.set_num_threads(opts.threads)
            from .probes import resolve_device

            device = resolve_device(opts.device)
        # Reports written but not yet installed, oldest first. The worker lays out one report's PDF while
        # this process builds the next; that one is installed once the next has been handed over.
        pending: list[PendingReport] = []
        failed = interrupted = False
        try:
            for i, job in todo:
                _log(opts, f"[{i}/{len(refs)}] {job.ref.path}")
                pending.append(build_one(job, opts, params, device, timer, worker))
                while len(pending) > (1 if worker is not None else 0):
                    folders.append(pending.pop(0).finish())  # (its PDF is usually done by now)
            while pending:
                folders.append(pending.pop(0).finish())
        except BaseException as e:
            failed = True
            if isinstance(e, KeyboardInterrupt):  # stop now: the reports not yet installed are dropped
                interrupted = True
                if worker is not None:
                    worker.close(kill=True)
                    worker = None
            for p in pending:  # otherwise a complete earlier report is still installed
                if p.done:
                    continue
                if interrupted:
                    p.abort()
                    continue
                try:
                    folders.append(p.finish())
                except Exception:  # noqa: BLE001 - its own failure is secondary to the one being raised
                    p.abort()
            raise
        finally:
            # also after a later checkpoint failed (it lists the reports written); not after Ctrl-C (the next
            # build, even one with nothing to rebuild, writes it)
            if folders and opts.write_index and not interrupted:
                with timer("site"):
                    from .site import write_site

                    # the overviews' PDFs are laid out by the warm worker, unless the build is failing
                    write_site(out, __version__, {job.ref.run for _, job in todo}, pdf="pdf" in opts.formats, dpi=opts.dpi,
                               worker=worker if not failed else None)
    finally:
        if worker is not None:
            worker.close()
    index = f"; site index: {out / 'index.html'}" if opts.write_index else ""
    _log(opts, f"{len(todo)} report(s) built, {len(refs) - len(todo)} up to date{index}")
    return folders


def check_out(out: Path) -> None:
    """--out is a folder this process can write into, or can be made in one: checked before any probe."""
    import os

    p = out
    while not p.exists() and not p.is_symlink():  # the nearest part of the path that exists
        p = p.parent
    if not p.is_dir():
        what = "a file" if p.is_file() else "a broken symbolic link" if not p.exists() else "not a folder"
        raise ReportgenError(f"{out}: --out is {what}" if p == out else f"{out}: --out cannot be created: {p} is {what}")
    if not os.access(p, os.W_OK | os.X_OK):
        raise ReportgenError(f"{out}: --out is not writable" if p == out else
                             f"{out}: --out cannot be created: {p} is not writable")


def build_one(job: Job, opts: BuildOptions, params: dict, device: str, timer: Timer, worker=None):
    """Gather a checkpoint's data (per kind), then write its report into a staged folder. Returns a
    `PendingReport`; `finish()` installs it once its PDF is done (the worker lays it out while this
    process goes on with the next checkpoint)."""
    if job.kind == "lm":
        from .lmreport import lm_context, lm_meta, prepare_lm

        prepared = prepare_lm(job, opts, params, device, timer, lambda m: _log(opts, m), _progress(opts, "sequences"))
        meta = lm_meta(job, opts, prepared, device)
        ctx = lm_context(meta, prepared)
        return write_report(job, opts, meta, ctx, prepared["trace"], prepared["sections"], timer, worker,
                            sae_dir=prepared["sae_dir"])
    from .trmreport import build_trm

    return build_trm(job, opts, params, device, timer, worker)


class PendingReport:
    """A report written into its staged folder whose PDF the render worker may still be laying out."""

    def __init__(self, staged, opts: BuildOptions, timer: Timer, worker, jobs: tuple[int, int]):
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
            _log(self.opts, f"  wrote {self.staged.final}")
        return self.staged.final

    def abort(self) -> None:
        self.done = True
        self.staged.abort()


def write_report(job: Job, opts: BuildOptions, meta: dict, ctx: dict, trace, sections: list, timer: Timer, worker=None,
                 sae_dir: Path | None = None) -> PendingReport:
    """Figures, data, HTML and PDF into a temporary folder; the returned PendingReport swaps it in for
    `job.final` once the PDF is written."""
    import shutil

    from .figures import display_size, save
    from .render import inline_images, render, source_date
    from .site import REPORT_META, Staged

    final, key = job.final, job.key
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
            sorted(f"sae/{p.name}" for p in sae_dir.iterdir() if p.is_file()) if sae_dir else [])
        meta["cache_key"] = key
        if sae_dir is not None:
            shutil.copytree(sae_dir, tmp / "sae")
            shutil.rmtree(sae_dir, ignore_errors=True)
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
                (tmp / "data" / f"{s['name']}.json").write_text(json.dumps(s["data"], indent=1, allow_nan=False,
                                                                           default=_json_default) + "\n")
            (tmp / REPORT_META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        with timer("html"):
            if "html" in opts.formats:
                svg = {f.stem: f.files["svg"] for f in figs}
                (tmp / "index.html").write_text(render("report.html", src=svg, links=True, **ctx), encoding="utf-8")
            if opts.self_contained:  # one file, no reference outside it: figures as data: URIs, no file links
                page = render("report.html", src={f.stem: f.files["svg"] for f in figs}, links=False, **ctx)
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


# options that change a report's content: those of every kind, and each kind's own (an option of another
# kind, e.g. --mask-rate for a TRM report, never makes a report stale)
COMMON_OPTION_FIELDS = ("eval", "device", "dpi", "formats", "figure_formats", "self_contained")
TRM_OPTION_FIELDS = ("split", "samples", "select", "seed", "dtype")


def cache_key(sha: str, config_path: Path | None, data_dir: Path, opts: BuildOptions, params: dict,
              files: list[Path] | None = None, kind: str = "trm") -> str:
    """Digest of everything a report depends on: checkpoint and config bytes, the dataset split's files,
    the options of its kind and the parameters of the analyses it runs, and the reportgen version."""
    import dataclasses
    import hashlib

    import analyses

    from .lmreport import LM_OPTION_FIELDS

    h = hashlib.sha256()
    h.update(sha.encode())
    if config_path is not None:
        h.update(config_path.read_bytes())
    if files is None:
        split_dir = data_dir / opts.split
        files = [f for f in sorted(split_dir.glob("*")) if f.is_file()] if split_dir.is_dir() else []
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    own = {"trm": TRM_OPTION_FIELDS, "lm": LM_OPTION_FIELDS}[kind]
    fields = {k: getattr(opts, k) for k in COMMON_OPTION_FIELDS + own}
    runs = {m.NAME for m in analyses.for_subject(kind) if not opts.only or m.NAME in opts.only}
    fields["analyses"] = sorted(runs)  # what --only selects of this kind, not how it was spelled
    fields["params"] = {name: dataclasses.asdict(p) for name, p in sorted(params.items()) if name in runs}
    fields["kind"] = kind
    fields["version"] = __version__
    h.update(json.dumps(fields, sort_keys=True, default=str).encode())
    return h.hexdigest()


def up_to_date(final: Path, key: str) -> bool:
    """True when the report in `final` was built from the same inputs and all its files are there."""
    from .site import REPORT_META

    try:
        meta = json.loads((final / REPORT_META).read_text())
    except (OSError, ValueError):
        return False
    return meta.get("cache_key") == key and all((final / f).is_file() for f in meta.get("files", []))


def _json_default(o):
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def report_files(opts: BuildOptions, sections: list) -> list[str]:
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
