"""TRM benchmarks (issue: TRM slice). Prints one line per figure; never part of the test run.

(a) `reportgen build` on the shipped example, HTML + PDF, cold (fresh process, fresh output folder):
    total wall time and its split. Target: <= 10 s total, <= 3 s outside model passes and imports.
(b) the probe on the real-size Sudoku att config (hidden 512, 8 heads, 2 layers, H_cycles 3, L_cycles 6,
    16 ACT steps, random weights), 8 puzzles: achieved GFLOP/s as a fraction of a plain fp32 matmul's
    GFLOP/s (the model's largest GEMM shape) measured in the same run. Target >= 80 %.
(c) one 6-panel latent figure, our way (SVG + PNG from one Canvas) versus a matplotlib figure with one
    ax.text per cell (PNG only) of the same content, in the same run. Target >= 20x faster.
(d) the evaluation pass (what `--eval` runs: all ACT steps, compact per-puzzle arrays, no full trace) on the
    real-size Sudoku att config with random weights on the CPU, at 1 and at 2 threads: puzzles per second and
    per minute (the README quotes it), and what --eval all's CPU cap amounts to at that size.
(e) the per-cycle capture of the recursion analysis (run_trm with cycles="H" and "L": full latents of the drawn
    puzzles, per-cycle lens/change reductions of all) against the same pass without it, real-size config, one
    drawn puzzle among --eval-n: the time ratio, median of --repeat interleaved runs. Target <= 1.1x.

The machine is shared and noisy: each figure is the median of --repeat runs, and thread counts are set
explicitly (--threads, default 1).

    python benchmarks/bench_trm.py [--ckpt PATH] [--repeat 3] [--threads 1] [--only a,b,c,d,e] [--eval-n 4]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def default_ckpt() -> Path:
    runs = sorted((ROOT / "examples" / "sudoku" / "checkpoints").glob("*/step_*"),
                  key=lambda p: (p.parent.name, int(p.name.split("_")[1])))
    if not runs:
        sys.exit("no example checkpoint under examples/sudoku/checkpoints; pass --ckpt")
    return runs[-1]


def bench_build(ckpt: Path, repeat: int, threads: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    rows = []
    for _ in range(repeat):
        with tempfile.TemporaryDirectory() as out:
            t0 = time.perf_counter()
            p = subprocess.run([sys.executable, "-m", "reportgen", "build", "--ckpt", str(ckpt), "--out", out,
                                "--threads", str(threads), "--timings", "-q"], cwd=ROOT, env=env,
                               capture_output=True, text=True)
            total = time.perf_counter() - t0
            if p.returncode:
                sys.exit(p.stderr)
            phases = json.loads(p.stderr.strip().splitlines()[-1])
            worker = phases.pop("worker", 0.0)  # in parallel with the phases below, on the other core
            phases["startup"] = total - sum(phases.values())  # interpreter + CLI before the build starts
            phases["worker"] = worker
            phases["total"] = total
            rows.append(phases)
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    outside = med["total"] - med["imports"] - med["probe"] - med["startup"]
    split = ", ".join(f"{k} {med[k]:.2f}" for k in ("startup", "plan", "imports", "load", "probe", "analyses", "figures",
                                                    "html", "pdf", "site"))
    split += f"; in parallel, the render worker process (WeasyPrint import, chart PNGs, PDF layout) worked {med['worker']:.2f} s"
    print(f"(a) build {ckpt.relative_to(ROOT) if ckpt.is_relative_to(ROOT) else ckpt} html+pdf cold: "
          f"total {med['total']:.2f} s (target <= 10); outside model passes and imports {outside:.2f} s "
          f"(target <= 3) [{split}; median of {repeat}, {threads} thread(s)]")


def real_size(n: int):
    """The real-size Sudoku att config (shared/specs/trm.md) with random weights, and n random puzzles."""
    import numpy as np
    import torch

    from reportgen.checkpoints import TRMSubject
    from reportgen.models.trm import TRM, TRMConfig

    torch.manual_seed(0)
    cfg = TRMConfig(hidden_size=512, num_heads=8, expansion=4, H_cycles=3, L_cycles=6, L_layers=2, halt_max_steps=16,
                    puzzle_emb_ndim=512, puzzle_emb_len=16, pos_encodings="rope", forward_dtype="float32")
    subj = TRMSubject(ref=None, model=TRM(cfg).eval(), config=cfg, trained_dtype="bfloat16", run_config={},
                      config_path=None)
    rng = np.random.default_rng(0)
    labels = rng.integers(2, 11, size=(n, 81))
    inputs = np.where(rng.random((n, 81)) < 0.6, 1, labels)
    return subj, inputs, labels


def bench_eval(repeat: int, n: int = 8) -> None:
    import numpy as np
    import torch

    from reportgen.probes.trm import eval_cap, run_trm

    subj, inputs, labels = real_size(n)
    args = (subj, inputs, labels, np.zeros(n, np.int64), np.arange(n), np.zeros(n, bool), "cpu", n)
    run_trm(subj, inputs[:1], labels[:1], np.zeros(1, np.int64), np.arange(1), np.zeros(1, bool), "cpu")  # warm-up
    rates = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            run_trm(*args)
            times.append(time.perf_counter() - t0)
        rates[threads] = n / statistics.median(times)
    cap = eval_cap(subj.config, "cpu")
    print("(d) evaluation pass, real-size Sudoku att config (random weights), CPU: " + "; ".join(
        f"{r:.2f} puzzles/s = {60 * r:.0f} puzzles/min at {t} thread(s)" for t, r in rates.items())
        + f" [batches of {n}, median of {repeat}]; --eval all on a CPU stops at {cap} puzzles at this size "
          f"(about {cap / rates[1] / 60:.0f} min at 1 thread)")


def bench_probe(repeat: int, threads: int) -> None:
    import numpy as np
    import torch

    from reportgen.models.trm import inner_width
    from reportgen.probes.trm import probe_trm, trm_flops

    torch.set_num_threads(threads)
    B = 8
    subj, inputs, labels = real_size(B)
    cfg = subj.config
    args = (subj, inputs, labels, np.zeros(B, np.int64), np.arange(B), "cpu")
    probe_trm(subj, inputs[:1], labels[:1], np.zeros(1, np.int64), np.arange(1), "cpu")  # warm-up
    flops = trm_flops(cfg, B)
    # reference: the model's largest GEMM, [B*L, D] x [D, 2I], plain torch.mm in fp32
    a = torch.randn(B * cfg.total_len, cfg.hidden_size)
    w = torch.randn(cfg.hidden_size, 2 * inner_width(cfg.expansion, cfg.hidden_size))
    mm_flops = 2 * a.shape[0] * a.shape[1] * w.shape[1]
    probe_rates, mm_rates = [], []
    for _ in range(repeat):  # interleaved, so both see the same machine load
        t0 = time.perf_counter()
        probe_trm(*args)
        probe_rates.append(flops / (time.perf_counter() - t0) / 1e9)
        n = 60
        t0 = time.perf_counter()
        for _ in range(n):
            torch.mm(a, w)
        mm_rates.append(n * mm_flops / (time.perf_counter() - t0) / 1e9)
    pr, mr = statistics.median(probe_rates), statistics.median(mm_rates)
    print(f"(b) probe, real-size Sudoku att config, {B} puzzles x {cfg.halt_max_steps} ACT steps: {pr:.1f} GFLOP/s = "
          f"{100 * pr / mr:.0f}% of a plain fp32 matmul's {mr:.1f} GFLOP/s (target >= 80%) "
          f"[{flops / 1e9:.0f} GFLOP per probe; median of {repeat}, {threads} thread(s)]")


def bench_cycles(repeat: int, threads: int, n: int) -> None:
    import numpy as np
    import torch

    from reportgen.probes.trm import run_trm

    torch.set_num_threads(threads)
    subj, inputs, labels = real_size(n)
    keep = np.zeros(n, bool)
    keep[0] = True  # one drawn puzzle keeps the full per-cycle latents; all get the reductions
    args = (subj, inputs, labels, np.zeros(n, np.int64), np.arange(n), keep, "cpu", n)
    run_trm(subj, inputs[:1], labels[:1], np.zeros(1, np.int64), np.arange(1), keep[:1], "cpu", 1, cycles="L")  # warm-up
    times = {None: [], "H": [], "L": []}
    for _ in range(repeat):  # interleaved, so all see the same machine load
        for mode in times:
            t0 = time.perf_counter()
            run_trm(*args, cycles=mode)
            times[mode].append(time.perf_counter() - t0)
    base = statistics.median(times[None])
    ratios = {m: statistics.median(t / b for t, b in zip(times[m], times[None])) for m in ("H", "L")}
    print(f"(e) per-cycle capture, real-size Sudoku att config, {n} puzzles (1 drawn) x 16 ACT steps: without "
          f"{base:.2f} s; cycles=H {ratios['H']:.3f}x, cycles=L {ratios['L']:.3f}x (target <= 1.1x) "
          f"[ratio per interleaved run, median of {repeat}, {threads} thread(s)]")


def bench_figure(repeat: int) -> None:
    import numpy as np

    from analyses import sudoku_latents
    from reportgen.boards import token_str

    rng = np.random.default_rng(0)
    lab = rng.integers(2, 11, size=81)
    inp = np.where(rng.random(81) < 0.5, 1, lab)
    pred = np.where(rng.random(81) < 0.8, lab, rng.integers(2, 11, size=81))
    s = {"inputs": inp.tolist(), "labels": lab.tolist(), "preds": pred.tolist(), "confidence": rng.random(81).tolist(),
         "z_H_tokens": rng.integers(1, 11, size=81).tolist(), "z_L_tokens": rng.integers(1, 11, size=81).tolist()}
    panels = [s["inputs"], s["labels"], s["preds"], s["z_H_tokens"], s["z_L_tokens"], s["preds"]]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def ours(path):
        c = sudoku_latents.draw_sample(s)
        Path(path + ".svg").write_text(c.svg())
        Path(path + ".png").write_bytes(c.png())

    def mpl(path):
        fig, axes = plt.subplots(2, 3, figsize=(9, 6.4))
        for ax, name, grid in zip(axes.flat, sudoku_latents.PANELS, panels):
            g = np.array(grid).reshape(9, 9)
            ax.imshow(np.array(s["confidence"]).reshape(9, 9), cmap="Blues", vmin=0, vmax=1)
            for i in range(9):
                for j in range(9):
                    ax.text(j, i, token_str(g[i, j]), ha="center", va="center", fontsize=9)
            for k in range(10):
                lw = 2 if k % 3 == 0 else 0.5
                ax.axhline(k - 0.5, color="k", lw=lw)
                ax.axvline(k - 0.5, color="k", lw=lw)
            ax.set_title(name)
            ax.set_xticks([])
            ax.set_yticks([])
        fig.tight_layout()
        fig.savefig(path + ".png", dpi=150)
        plt.close(fig)

    with tempfile.TemporaryDirectory() as d:
        ours(f"{d}/warm")
        mpl(f"{d}/warm")
        t_ours, t_mpl = [], []
        for k in range(repeat):
            t0 = time.perf_counter()
            ours(f"{d}/o{k}")
            t_ours.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            mpl(f"{d}/m{k}")
            t_mpl.append(time.perf_counter() - t0)
    o, m = statistics.median(t_ours), statistics.median(t_mpl)
    print(f"(c) 6-panel latent figure: ours {1000 * o:.0f} ms (SVG + PNG) vs matplotlib ax.text per cell "
          f"{1000 * m:.0f} ms (PNG only): {m / o:.0f}x faster (target >= 20x) [median of {repeat}]")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ckpt", type=Path, help="checkpoint for (a) [default: the shipped example's last step]")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", default="a,b,c,d,e", help="which benchmarks to run, e.g. a,c")
    ap.add_argument("--eval-n", type=int, default=4, help="puzzles of (e)")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    sys.path.insert(0, str(ROOT))
    which = set(args.only.split(","))
    if "a" in which:
        bench_build(args.ckpt or default_ckpt(), args.repeat, args.threads)
    if "b" in which:
        bench_probe(args.repeat, args.threads)
    if "c" in which:
        bench_figure(max(args.repeat, 5))
    if "d" in which:
        bench_eval(args.repeat)
    if "e" in which:
        bench_cycles(args.repeat, args.threads, args.eval_n)


if __name__ == "__main__":
    main()
