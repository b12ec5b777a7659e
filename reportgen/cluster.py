"""`--executor slurm|local`: one job per checkpoint through submitit; the site index is written when all finish.

Each job runs `reportgen.build` for its one checkpoint with the same options (without the site index);
`local` runs the same jobs as local processes through submitit's LocalExecutor (for machines without
SLURM, and to test this path). submitit's logs and pickles go to a folder beside --out, never into it.
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from .errors import ReportgenError

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
        raise ReportgenError(f"--executor {opts.executor} needs submitit: pip install submitit") from None
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
        raise ReportgenError(f"--executor {opts.executor}: could not submit ({str(e).strip().splitlines()[0][:160]})") from None
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
