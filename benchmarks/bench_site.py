"""Site benchmarks (issue: training runs as sites). Prints one line per figure; never part of the test run.

For a run of 6 example checkpoints (the 4 shipped ones plus 2 copies under new step names), HTML + PDF:
- cold build time;
- rebuild time with nothing changed, as a share of the cold build (target <= 5 %);
- cold build with --jobs 2 versus --jobs 1, measured in the same run (target >= 1.6x on a 2-core machine);
- the cores each build kept busy (CPU time / wall time), and the --jobs 1 build confined to one core
  (sched_setaffinity): a single build already lays out each PDF in a second process while it probes the
  next checkpoint, so --jobs 1 is not a one-core baseline.

    python benchmarks/bench_site.py [--repeat 2]
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "examples" / "sudoku" / "checkpoints" / "trm_sudoku_easy"


def make_run(dst: Path) -> Path:
    run = dst / "trm_sudoku_easy"
    shutil.copytree(RUN, run)
    steps = sorted(run.glob("step_*"), key=lambda p: int(p.name.split("_")[1]))
    last = int(steps[-1].name.split("_")[1])
    for k, src in enumerate(steps[:2], 1):  # two more checkpoints, so the run has 6
        shutil.copy(src, run / f"step_{last + 300 * k}")
    return run


def build(run: Path, out: Path, *extra: str, cores: set[int] | None = None) -> tuple[float, float]:
    """Wall time and CPU time (this build's processes, user + system) of one `reportgen build`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "reportgen", "build", "--ckpt", str(run), "--out", str(out), "-q", *extra],
                       cwd=ROOT, env=env, capture_output=True, text=True,
                       preexec_fn=(lambda: os.sched_setaffinity(0, cores)) if cores else None)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode:
        sys.exit(p.stderr)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    one_core = {min(os.sched_getaffinity(0))}
    runs: dict[str, list[tuple[float, float]]] = {"j1": [], "rebuild": [], "j2": [], "j1-1core": []}
    with tempfile.TemporaryDirectory() as d:
        run = make_run(Path(d))
        for k in range(args.repeat):  # interleaved, so drift in the machine's load hits every variant alike
            out1, out2, out3 = (Path(d) / f"site{n}-{k}" for n in (1, 2, 3))
            runs["j1"].append(build(run, out1, "--jobs", "1"))
            runs["rebuild"].append(build(run, out1, "--jobs", "1"))
            runs["j2"].append(build(run, out2, "--jobs", "2"))
            runs["j1-1core"].append(build(run, out3, "--jobs", "1", cores=one_core))
    wall = {k: statistics.median(w for w, _ in v) for k, v in runs.items()}
    busy = {k: statistics.median(c / w for w, c in v) for k, v in runs.items()}
    c, r, a, b, s1 = wall["j1"], wall["rebuild"], wall["j1"], wall["j2"], wall["j1-1core"]
    print(f"cold build, 6 checkpoints, html+pdf: {c:.1f} s [median of {args.repeat}; {busy['j1']:.2f} cores busy]")
    print(f"rebuild with nothing changed: {r:.2f} s = {100 * r / c:.1f}% of cold (target <= 5%)")
    print(f"--jobs 2 vs --jobs 1, cold: {b:.1f} s vs {a:.1f} s = {a / b:.2f}x (target >= 1.6x on 2 cores) "
          f"[--jobs 2 keeps {busy['j2']:.2f} cores busy]")
    print(f"--jobs 1 confined to one core: {s1:.1f} s; on {len(os.sched_getaffinity(0))} cores --jobs 1 is "
          f"{s1 / a:.2f}x and --jobs 2 {s1 / b:.2f}x faster than that")


if __name__ == "__main__":
    main()
