"""Build orchestration: checkpoint → subject → probe → analyses → figures → HTML/PDF → site.

`run_build` first validates every option, then per checkpoint gathers all data before writing
anything, writes the report into a temporary folder and swaps it in, and finally rewrites the site index.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ._version import __version__
from .config import BuildOptions, eval_count, memory_budget, validate  # noqa: F401  (BuildOptions: reportgen.build's API)
from .errors import ReportgenError
from .log import Timer, log, progress

@dataclass
class Job:
    """One checkpoint's build, planned before any heavy import: its kind, its report folder and its digest."""

    ref: object  # CheckpointRef
    kind: object  # the kind module (reportgen/kinds)
    final: Path  # the report folder
    sha: str
    key: str


def plan(ref, opts: BuildOptions, params: dict, out: Path) -> Job:
    """The checkpoint's kind (an adapter when one is named), its input files and the report's digest."""
    from . import kinds
    from .cache import cache_key
    kind = kinds.get("adapter") if opts.adapter else kinds.detect(ref.path)
    if kind is None:  # refused when its turn comes, after the reports before it (as an unreadable file is)
        return Job(ref, kinds.Unclaimed, out / ref.run / ref.name, "", "")
    if hasattr(kind, "check"):
        kind.check(ref, opts)
    files = kind.inputs(ref, opts)
    sha = ref.sha256
    return Job(ref, kind, out / ref.run / ref.name, sha, cache_key(sha, kind, opts, params, files))


def run_build(opts: BuildOptions, timer: Timer | None = None, exiting: bool = False) -> list[Path]:
    """Build every checkpoint's report and the site index; returns the report folders. `exiting`: the process
    ends after this (the command line), so what was loaded stays frozen (see `kinds.collection_deferred`).

    Reports whose inputs are unchanged are skipped before torch, matplotlib or WeasyPrint is imported,
    so a rebuild with nothing new costs little more than hashing the inputs."""
    from . import cache
    from .kinds import discover
    from .render import set_templates

    timer = timer or Timer()
    set_templates(opts.templates)
    params = validate(opts)
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
            if not opts.force and cache.up_to_date(job.final, job.key):
                log(opts, f"[{i}/{len(refs)}] up to date: {job.final} (inputs unchanged; --force rebuilds)")
                folders.append(job.final)
            else:
                todo.append((i, job))
    if (opts.executor != "none" and todo) or (opts.jobs > 1 and len(todo) > 1):
        return build_elsewhere(opts, refs, todo, folders, out, timer)
    worker = None
    if todo and "pdf" in opts.formats:
        from .render import RenderWorker

        worker = RenderWorker()  # imports WeasyPrint in parallel with torch below
    from .kinds import collection_deferred

    try:
        with collection_deferred(unfreeze=not exiting):  # the collector off while loading (see there)
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
            pending: list = []  # writer.PendingReport
            failed = interrupted = False
            try:
                for i, job in todo:
                    log(opts, f"[{i}/{len(refs)}] {job.ref.path}")
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
    log(opts, f"{len(todo)} report(s) built, {len(refs) - len(todo)} up to date{index}")
    return folders


def build_elsewhere(opts: BuildOptions, refs, todo: list, folders: list[Path], out: Path, timer: Timer) -> list[Path]:
    """--jobs N or --executor: the stale checkpoints are built by `reportgen build` processes (N subprocesses
    sharing the CPU threads, or one submitit job each); then the reports they finished are indexed here."""
    import os

    from .cache import up_to_date
    from .config import command_line
    from .executors import run_jobs, run_processes

    child = dict(jobs=1, executor="none", write_index=False)
    with timer("jobs"):
        if opts.executor != "none":
            cmds = [(str(job.ref.path), command_line(opts, [str(job.ref.path)], threads=opts.threads or opts.slurm_cpus,
                                                     **child)) for _, job in todo]
            errors = run_jobs(opts.executor, cmds, out, partition=opts.slurm_partition, gpus=opts.slurm_gpus,
                              minutes=opts.slurm_time, cpus=opts.slurm_cpus, quiet=opts.quiet)
            how = f"by {opts.executor} jobs"
        else:
            n = min(opts.jobs, len(todo))
            threads = opts.threads or max(1, (os.cpu_count() or 1) // n)
            shares = [[str(job.ref.path) for _, job in todo[k::n]] for k in range(n)]
            errors = run_processes([command_line(opts, share, threads=threads, **child) for share in shares], opts.quiet)
            how = f"in {n} processes"
    done = [job.final for _, job in todo if up_to_date(job.final, job.key)]
    folders += done
    if folders and opts.write_index:
        with timer("site"):
            from .site import write_site

            write_site(out, __version__, {job.ref.run for _, job in todo}, pdf="pdf" in opts.formats, dpi=opts.dpi)
    if errors:
        raise ReportgenError(errors[0] + (f" (and {len(errors) - 1} more failed job(s))" if len(errors) > 1 else ""))
    log(opts, f"{len(done)} report(s) built {how}, {len(refs) - len(todo)} up to date; site index: {out / 'index.html'}")
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
    """Gather a checkpoint's data (its kind loads, probes and analyses), then write its report into a staged
    folder. Returns a `PendingReport`; `finish()` installs it once its PDF is done (the worker lays it out while
    this process goes on with the next checkpoint)."""
    from .kinds import GatherContext, freeze_loaded
    from .writer import write_report

    gc = GatherContext(device=device, timer=timer, log=lambda m: log(opts, m),
                       make_progress=lambda what: progress(opts, what))
    gathered = job.kind.gather(job, opts, params, gc)
    freeze_loaded()  # the built-in kinds did so before their probe; a plugin kind may not have
    return write_report(job, opts, gathered, timer, worker)
