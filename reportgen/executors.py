"""Running `reportgen build` command lines elsewhere: `--jobs N` (local subprocesses) and `--executor
slurm|local` (one submitit job per command). They get the command lines to run and return the error
lines of those that failed; they know nothing of the build (build.py plans, writes the index after).

`local` runs the same jobs as local processes through submitit's LocalExecutor (for machines without
SLURM, and to test this path). submitit's logs and pickles go to a folder beside --out, never into it.
"""
from __future__ import annotations

import sys
from pathlib import Path

from .errors import ReportgenError, first_line

EXECUTORS = ("none", "slurm", "local")
ERROR_PREFIX = "reportgen: error: "


def _error_line(returncode: int, stderr: str) -> str:
    """The child's own error line (without the prefix), or what killed it."""
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    line = next((ln for ln in reversed(lines) if ln.startswith(ERROR_PREFIX)), None)
    return line.removeprefix(ERROR_PREFIX) if line else f"a build process failed (exit {returncode})"


def run_command(argv: list[str]) -> dict:
    """A submitit job: run one `reportgen build` command line; {"error": line | None}."""
    import subprocess

    proc = subprocess.run(argv, stderr=subprocess.PIPE, text=True)
    return {"error": _error_line(proc.returncode, proc.stderr) if proc.returncode else None}


def run_processes(commands: list[list[str]], quiet: bool = False) -> list[str]:
    """--jobs N: the command lines as parallel subprocesses (each with its share of checkpoints and threads);
    the error lines of those that failed. Their progress is shown when they end."""
    import subprocess

    procs = [subprocess.Popen(c, stderr=subprocess.PIPE, text=True) for c in commands]
    errors = []
    for proc in procs:
        _, err = proc.communicate()
        if proc.returncode:
            errors.append(_error_line(proc.returncode, err))
        elif not quiet and err.strip():
            print("\n".join(ln for ln in err.splitlines() if ln.strip()), file=sys.stderr, flush=True)
    return errors


def logs_folder(out: Path) -> Path:
    out = out.resolve()
    return out.parent / f".{out.name}-submitit"


def run_jobs(executor: str, commands: list[tuple[str, list[str]]], out: Path, *, partition: str | None = None,
             gpus: int = 0, minutes: int = 60, cpus: int = 4, quiet: bool = False) -> list[str]:
    """--executor slurm|local: one submitit job per (checkpoint, command line); waits for all and returns the
    error lines of those that failed."""
    try:
        import submitit
    except ImportError:
        raise ReportgenError(f"--executor {executor} needs submitit: pip install 'reportgen[slurm]'") from None
    folder = logs_folder(out)
    ex = submitit.AutoExecutor(folder=str(folder / "%j"), cluster="slurm" if executor == "slurm" else "local")
    params = {"name": "reportgen", "timeout_min": minutes, "cpus_per_task": cpus}
    if executor == "slurm":
        params.update(slurm_partition=partition, gpus_per_node=gpus)
        params = {k: v for k, v in params.items() if v is not None}
    ex.update_parameters(**params)
    try:
        jobs = [ex.submit(run_command, argv) for _, argv in commands]
    except Exception as e:  # noqa: BLE001 - sbatch missing, partition refused, ...
        raise ReportgenError(f"--executor {executor}: could not submit ({first_line(e, 160)})") from None
    if not quiet:
        print(f"  submitted {len(jobs)} job(s) ({executor}); logs in {folder}", file=sys.stderr, flush=True)
    errors = []
    for (what, _), j in zip(commands, jobs):
        try:
            res = j.result()
        except Exception as e:  # noqa: BLE001 - the job itself crashed (killed, out of time, ...)
            last = [ln for ln in str(e).strip().splitlines() if ln.strip()]
            res = {"error": f"{what}: job {j.job_id} failed ({last[-1][:160] if last else type(e).__name__})"}
        if res.get("error"):
            errors.append(res["error"])
    return errors
