"""Headline numbers with their n and a 95% interval.

Every metric a report states (on its page, in report.json, manifest.json and summary.md) is a dict made
here: {"value", "n", "lo", "hi", "interval"}; `interval` names the method ("wilson" for a proportion of n
trials, "bootstrap" for a mean of n values, "none" where no interval applies, e.g. a count).
"""
from __future__ import annotations

import math

import numpy as np

Z95 = 1.959963984540054


def metric(value, n: int, lo=None, hi=None, interval: str = "none") -> dict:
    f = (lambda v: None if v is None or (isinstance(v, float) and not math.isfinite(v)) else float(v))
    return {"value": f(value), "n": int(n), "lo": f(lo), "hi": f(hi), "interval": interval}


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion k/n (n > 0)."""
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (0.0 if k == 0 else max(0.0, c - h)), (1.0 if k == n else min(1.0, c + h))  # exact at the ends (no rounding)


def proportion(k: int, n: int) -> dict:
    """k successes of n trials, with the Wilson interval; value None when n is 0."""
    k, n = int(k), int(n)
    if n == 0:
        return metric(None, 0, interval="wilson")
    lo, hi = wilson(k, n)
    p = k / n
    return metric(p, n, min(lo, p), max(hi, p), "wilson")  # (rounding can put a bound a hair past p at 0 or 1)


def bootstrap_mean(values, n_boot: int = 2000, seed: int = 0) -> dict:
    """Mean of the values with a percentile bootstrap 95% interval (fixed seed: same inputs, same bytes)."""
    x = np.asarray(values, dtype=np.float64).ravel()
    x = x[np.isfinite(x)]
    if x.size == 0:
        return metric(None, 0, interval="bootstrap")
    if x.size == 1:
        return metric(x[0], 1, interval="bootstrap")
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    step = max(1, min(200, 4_000_000 // x.size))  # resamples per chunk: about 4M indices, bounded memory for large n
    for i in range(0, n_boot, step):
        m = min(step, n_boot - i)
        means[i:i + m] = x[rng.integers(0, x.size, size=(m, x.size))].mean(1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return metric(x.mean(), x.size, lo, hi, "bootstrap")


def bootstrap_ratios(num, den=None, n_boot: int = 2000, seed: int = 0) -> list[dict]:
    """Per row k of num [K, N] (and den [K, N], default all ones): sum(num[k]) / sum(den[k]) with a percentile
    bootstrap 95% interval (2000 resamples) that resamples the N units (e.g. puzzles) with one shared set of resamples for all rows
    (a cluster bootstrap when a unit holds several values, e.g. the blank cells of a puzzle). n is sum(den[k]):
    the values averaged. Memory is bounded (resamples in chunks of about 4M indices); time is O(n_boot·N·K)."""
    num = np.atleast_2d(np.asarray(num, dtype=np.float64))
    den = np.ones_like(num) if den is None else np.atleast_2d(np.asarray(den, dtype=np.float64))
    K, N = num.shape
    tot_num, tot_den = num.sum(1), den.sum(1)
    if N < 2:
        return [metric(a / b if b else None, b, interval="bootstrap") for a, b in zip(tot_num, tot_den)]
    rng = np.random.default_rng(seed)
    ratios = np.empty((K, n_boot))
    step = max(1, min(n_boot, 4_000_000 // N))
    for i in range(0, n_boot, step):  # each resample as counts per unit: its sums over all rows are one GEMM
        idx = rng.integers(0, N, size=(min(step, n_boot - i), N))
        w = np.stack([np.bincount(r, minlength=N) for r in idx]).astype(np.float64)  # [m, N]
        with np.errstate(invalid="ignore", divide="ignore"):
            ratios[:, i:i + len(w)] = (w @ num.T).T / (w @ den.T).T
    out = []
    for k in range(K):
        if not tot_den[k]:
            out.append(metric(None, 0, interval="bootstrap"))
            continue
        r = ratios[k][np.isfinite(ratios[k])]
        lo, hi = np.percentile(r, [2.5, 97.5]) if r.size else (None, None)
        out.append(metric(tot_num[k] / tot_den[k], tot_den[k], lo, hi, "bootstrap"))
    return out


def value(m):
    """The number of a metric dict (or a bare number from an older report.json)."""
    return m.get("value") if isinstance(m, dict) else m


def fmt(m, kind: str = "num", ci: bool = True) -> str:
    """'67.0% [64.2, 69.7] (n=16200)' for a pct metric; '1.23 [1.18, 1.29] (n=512)' for a num."""
    v = value(m)
    if v is None:
        return "–"
    pct = kind == "pct"
    s = f"{100 * v:.1f}%" if pct else f"{v:.3g}" if abs(v) < 1e-2 or abs(v) >= 1e4 else f"{v:.2f}"
    if ci and isinstance(m, dict) and m.get("lo") is not None:
        lo, hi = (100 * m["lo"], 100 * m["hi"]) if pct else (m["lo"], m["hi"])
        s += f" [{lo:.1f}, {hi:.1f}]" if pct else f" [{lo:.3g}, {hi:.3g}]"
    if isinstance(m, dict) and m.get("n") is not None:
        s += f" (n={m['n']})"
    return s


def reliability_bins(p, correct, n_bins: int, mean_key: str = "mean_confidence", rate_key: str = "accuracy"):
    """Calibration of probabilities p against outcomes `correct` (same shape): n_bins equal-width bins over [0, 1],
    each {"lo", "hi", "count", mean_key: mean p in the bin, rate_key: Wilson proportion correct}, and the expected
    calibration error (the count-weighted mean of |rate - mean p|) as a metric with n = p.size."""
    p = np.asarray(p, dtype=np.float64).ravel()
    y = np.asarray(correct, dtype=bool).ravel()
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.clip(np.digitize(p, edges[1:-1]), 0, n_bins - 1)
    bins, ece = [], 0.0
    for k in range(n_bins):
        m = which == k
        n = int(m.sum())
        rate = proportion(y[m].sum(), n)
        mean = float(p[m].mean()) if n else None
        bins.append({"lo": round(float(edges[k]), 6), "hi": round(float(edges[k + 1]), 6), "count": n,
                     mean_key: mean, rate_key: rate})
        if n:
            ece += n / p.size * abs(rate["value"] - mean)
    return bins, metric(ece if p.size else None, p.size)
