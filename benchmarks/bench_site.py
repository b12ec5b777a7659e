"""Site benchmarks (issue: training runs as sites). Prints one line per figure; never part of the test run.

For a run of 6 example checkpoints (the 4 shipped ones plus 2 copies under new step names), HTML + PDF:
- cold build time;
- rebuild time with nothing changed, as a share of the cold build (target <= 5 %);
- cold build with --jobs 2 versus --jobs 1, measured in the same run (target >= 1.6x on a 2-core machine).

    python benchmarks/bench_site.py [--repeat 2]
"""
from __future__ import annotations

import argparse
import os
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


def build(run: Path, out: Path, *extra: str) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "reportgen", "build", "--ckpt", str(run), "--out", str(out), "-q", *extra],
                       cwd=ROOT, env=env, capture_output=True, text=True)
    if p.returncode:
        sys.exit(p.stderr)
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    cold, rebuild, j1, j2 = [], [], [], []
    with tempfile.TemporaryDirectory() as d:
        run = make_run(Path(d))
        for k in range(args.repeat):
            out1, out2 = Path(d) / f"site1-{k}", Path(d) / f"site2-{k}"
            j1.append(build(run, out1, "--jobs", "1"))
            rebuild.append(build(run, out1, "--jobs", "1"))
            j2.append(build(run, out2, "--jobs", "2"))
        cold = j1
    c, r = statistics.median(cold), statistics.median(rebuild)
    a, b = statistics.median(j1), statistics.median(j2)
    print(f"cold build, 6 checkpoints, html+pdf: {c:.1f} s [median of {args.repeat}]")
    print(f"rebuild with nothing changed: {r:.2f} s = {100 * r / c:.1f}% of cold (target <= 5%)")
    print(f"--jobs 2 vs --jobs 1, cold: {b:.1f} s vs {a:.1f} s = {a / b:.2f}x (target >= 1.6x on 2 cores; "
          f"note a single build already runs its render worker on the second core)")


if __name__ == "__main__":
    main()
