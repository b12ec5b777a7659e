"""Building checkpoints in other processes: `--jobs N` (N `reportgen build` subprocesses on this machine)
and `--executor slurm|local` (one submitit job per checkpoint); the site index is written when all finish.

Each job runs `reportgen.build` for its one checkpoint with the same options (without the site index);
`local` runs the same jobs as local processes through submitit's LocalExecutor (for machines without
SLURM, and to test this path). submitit's logs and pickles go to a folder beside --out, never into it.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING
import sys
from pathlib import Path

from . import __version__
from .errors import ReportgenError, first_line


if TYPE_CHECKING:
    from .build import BuildOptions, Timer

EXECUTORS = ("none", "slurm", "local")


def run_one(opts_fields: dict) -> dict:
    """The job: build one checkpoint's report. Returns {"error": line} instead of raising for bad input."""
    from .build import BuildOptions, run_build

    try:
        run_build(BuildOptions(**opts_fields))
    except ReportgenError as e:
        return {"error": str(e)}
    return {"error": None}


def logs_folder(out: Path) -> Path:
    out = out.resolve()
    return out.parent / f".{out.name}-submitit"


def run_jobs(opts, todo: list) -> list[str]:
    """Submit one job per planned checkpoint, wait for all, and return their error lines."""
    try:
        import submitit
    except ImportError:
        raise ReportgenError(f"--executor {opts.executor} needs submitit: pip install 'reportgen[slurm]'") from None
    folder = logs_folder(Path(opts.out))
    ex = submitit.AutoExecutor(folder=str(folder / "%j"), cluster="slurm" if opts.executor == "slurm" else "local")
    params = {"name": "reportgen", "timeout_min": opts.slurm_time, "cpus_per_task": opts.slurm_cpus}
    if opts.executor == "slurm":
        params.update(slurm_partition=opts.slurm_partition, gpus_per_node=opts.slurm_gpus)
        params = {k: v for k, v in params.items() if v is not None}
    ex.update_parameters(**params)
    base = dataclasses.asdict(opts)
    base.update(jobs=1, executor="none", write_index=False, threads=opts.threads or opts.slurm_cpus)
    try:
        jobs = [ex.submit(run_one, {**base, "ckpts": [str(job.ref.path)]}) for _, job in todo]
    except Exception as e:  # noqa: BLE001 - sbatch missing, partition refused, ...
        raise ReportgenError(f"--executor {opts.executor}: could not submit ({first_line(e, 160)})") from None
    if not opts.quiet:
        print(f"  submitted {len(jobs)} job(s) ({opts.executor}); logs in {folder}", file=sys.stderr, flush=True)
    errors = []
    for (_, job), j in zip(todo, jobs):
        try:
            res = j.result()
        except Exception as e:  # noqa: BLE001 - the job itself crashed (killed, out of time, ...)
            last = [ln for ln in str(e).strip().splitlines() if ln.strip()]
            res = {"error": f"{job.ref.path}: job {j.job_id} failed ({last[-1][:160] if last else type(e).__name__})"}
        if res.get("error"):
            errors.append(res["error"])
    return errors


# ---------------------------------------------------------------- called by build.run_build


def child_args(opts: BuildOptions, ckpts: list[str], threads: int) -> list[str]:
    """The `reportgen build` command line of a --jobs child: the same options for a share of the checkpoints."""
    args = [sys.executable, "-m", "reportgen", "build", "--out", opts.out, "--split", opts.split, "--samples",
            str(opts.samples), "--select", opts.select, "--seed", str(opts.seed), "--device", opts.device, "--dtype",
            opts.dtype, "--format", ",".join(opts.formats), "--figure-formats", ",".join(opts.figure_formats),
            "--threads", str(threads), "--eval", str(opts.eval), "--dpi", str(opts.dpi), "--max-memory",
            str(opts.max_memory), "--no-index"]
    for c in ckpts:
        args += ["--ckpt", c]
    for flag, value in (("--data", opts.data), ("--only", ",".join(opts.only or [])), ("--config", opts.config)):
        if value:
            args += [flag, value]
    for p in opts.params:
        args += ["--param", p]
    args += ["--seq-len", str(opts.seq_len), "--max-seqs", str(opts.max_seqs), "--mask-rate", str(opts.mask_rate),
             "--sae-arch", opts.sae_arch, "--sae-tokens", str(opts.sae_tokens)]
    for flag, value in (("--vocab", opts.vocab), ("--sae", opts.sae), ("--train-sae", opts.train_sae),
                        ("--mask-id", opts.mask_id)):
        if value is not None:
            args += [flag, str(value)]
    args += [f for f, on in (("--self-contained", opts.self_contained), ("--force", opts.force), ("-q", opts.quiet),
                             ("--trust-checkpoint", opts.trust_checkpoint)) if on]
    return args


def run_parallel(opts: BuildOptions, refs, todo, folders: list[Path], out: Path, timer: Timer) -> list[Path]:
    """--jobs N: the stale checkpoints are shared among N `reportgen build` processes (plain subprocesses,
    like the render worker), each with its share of the CPU threads; the site index is written once at the end."""
    import os
    import subprocess

    from .build import _log

    n = min(opts.jobs, len(todo))
    threads = opts.threads or max(1, (os.cpu_count() or 1) // n)
    shares = [[str(job.ref.path) for _, job in todo[k::n]] for k in range(n)]
    with timer("jobs"):
        procs = [subprocess.Popen(child_args(opts, share, threads), stderr=subprocess.PIPE, text=True) for share in shares]
        errors = []
        for proc in procs:
            _, err = proc.communicate()
            lines = [ln for ln in err.splitlines() if ln.strip()]
            if proc.returncode:
                errors.append(next((ln for ln in reversed(lines) if ln.startswith("reportgen: error: ")),
                                   f"reportgen: error: a --jobs process failed (exit {proc.returncode})"))
            elif not opts.quiet and lines:
                print("\n".join(lines), file=sys.stderr, flush=True)
    done = index_finished(opts, todo, folders, out, timer)
    if errors:
        raise ReportgenError(errors[0].removeprefix("reportgen: error: "))
    _log(opts, f"{len(done)} report(s) built in {n} processes, {len(refs) - len(todo)} up to date; "
               f"site index: {out / 'index.html'}")
    return folders


def index_finished(opts: BuildOptions, todo, folders: list[Path], out: Path, timer: Timer) -> list[Path]:
    """After other processes built `todo`: the reports they finished, added to `folders`, and the site index."""
    from .build import up_to_date

    done = [job.final for _, job in todo if up_to_date(job.final, job.key)]
    folders += done
    if folders and opts.write_index:
        with timer("site"):
            from .site import write_site

            write_site(out, __version__, {job.ref.run for _, job in todo}, pdf="pdf" in opts.formats, dpi=opts.dpi)
    return done


def run_executor(opts: BuildOptions, refs, todo, folders: list[Path], out: Path, timer: Timer) -> list[Path]:
    """--executor slurm|local: one submitit job per stale checkpoint; the site index once they all finish."""
    from .build import _log

    with timer("jobs"):
        errors = run_jobs(opts, todo)
    done = index_finished(opts, todo, folders, out, timer)
    if errors:
        raise ReportgenError(errors[0] + (f" (and {len(errors) - 1} more failed job(s))" if len(errors) > 1 else ""))
    _log(opts, f"{len(done)} report(s) built by {opts.executor} jobs, {len(refs) - len(todo)} up to date; "
               f"site index: {out / 'index.html'}")
    return folders
