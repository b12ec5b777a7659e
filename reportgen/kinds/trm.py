"""The `trm` kind: upstream TRM checkpoints (step_N files, all_config.yaml beside them) on a Sudoku dataset in
the upstream layout. Load → probe every ACT step over the evaluation puzzles → analyses; report meta and page.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .._version import __version__
from ..errors import ReportgenError
from . import freeze_loaded

NAME = "trm"
DESCRIPTION = "TRM"  # as the error on an unknown checkpoint lists the kinds
SUBJECT = "trm"


@dataclass
class Options:
    """The build options a TRM report depends on (the cache digest covers these)."""

    split: str = "test"
    samples: int = 5
    select: str = "first"
    seed: int = 0
    dtype: str = "float32"
    data: str | None = None


def sniff(path: Path) -> bool:
    """A TRM checkpoint, by its state-dict keys (a file no kind claims is refused by kinds.unknown_checkpoint,
    which says why when it cannot be read at all)."""
    from ..checkpoints import TRM_MARKERS, pickle_head

    head = pickle_head(path) if path.is_file() else None
    return head is not None and all(m in head for m in TRM_MARKERS)


def check(ref, opts) -> None:
    if opts.dtype not in ("float32", "bfloat16", "float16", "config"):
        raise ReportgenError(f"--dtype {opts.dtype}: a TRM runs in float32, bfloat16, float16 or config")


def _located(ref, opts):
    """(run config, its path, dataset folder, how it was found)."""
    from ..checkpoints import read_run_config, read_state_dict

    try:
        run_config, config_path = read_run_config(ref.path)
        data_dir, data_how = resolve_data(opts, run_config, ref.path)
    except ReportgenError:
        read_state_dict(ref.path)  # an unreadable checkpoint is the problem to report first
        raise
    return run_config, config_path, data_dir, data_how


def inputs(ref, opts) -> list[Path]:
    """all_config.yaml and the files of the dataset split."""
    _, config_path, data_dir, _ = _located(ref, opts)
    split_dir = data_dir / opts.split
    files = [f for f in sorted(split_dir.glob("*")) if f.is_file()] if split_dir.is_dir() else []
    return ([config_path] if config_path is not None else []) + files


def resolve_data(opts, run_config: dict, ckpt: Path) -> tuple[Path, str]:
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


def gather(job, opts, params: dict, gc):
    """Load, probe, analyse; returns the report's Gathered (nothing is written here)."""
    import analyses
    import numpy as np

    from ..config import eval_count, memory_budget
    from . import Gathered
    from ..checkpoints import is_trm, load_trm, read_state_dict, strip_trm_prefixes
    from ..data.puzzles import check_ids, read_split, select
    from ..probes.trm import eval_batch_size, eval_cap, run_trm

    ref, sha = job.ref, job.sha
    device, timer = gc.device, gc.timer
    run_config, config_path, data_dir, data_how = _located(ref, opts)
    with timer("load"):
        sd = strip_trm_prefixes(read_state_dict(ref.path))
        if not is_trm(sd):
            raise ReportgenError(
                f"{ref.path}: not a TRM checkpoint (no embed_tokens.embedding_weight, lm_head.weight and "
                f"L_level.layers.* tensors)")
        split = read_split(data_dir, opts.split)
        subject = load_trm(ref, sd, run_config, config_path, split.meta, opts.dtype)
        if int(split.meta["vocab_size"]) > subject.config.vocab_size:
            raise ReportgenError(f"{data_dir / opts.split / 'dataset.json'}: vocab_size {split.meta['vocab_size']} "
                                 f"is larger than the checkpoint's {subject.config.vocab_size}")
        check_ids(split, subject.config.vocab_size,
                  subject.config.num_puzzle_identifiers if subject.config.puzzle_emb_ndim > 0 else None)
        idx = select(len(split), opts.samples, opts.select, opts.seed, str(data_dir / opts.split))
    cfg = subject.config
    selected = [m for m in analyses.for_subject("trm") if not opts.only or m.NAME in opts.only]
    evaluation = plan_evaluation(len(split), eval_count(opts), eval_cap(cfg, device), str(data_dir / opts.split))
    n_eval = evaluation["puzzles"] if any(getattr(m, "USES_EVAL", False) for m in selected) else 0
    # one pass: the first n_eval puzzles (compact arrays for the metrics), then the drawn ones not among them;
    # the full trace is kept of the drawn puzzles only
    rows = np.concatenate([np.arange(n_eval), idx[idx >= n_eval]])
    keep = np.isin(rows, idx)
    batch = eval_batch_size(cfg, memory_budget(opts))
    capped = f" (the cap of --eval all on {device})" if evaluation["capped"] and n_eval else ""
    gc.log(f"  evaluating {n_eval} of {len(split)} puzzles{capped}, drawing {len(idx)}: {cfg.halt_max_steps} ACT "
               f"steps × {len(rows)} puzzles on {device} ({cfg.forward_dtype}), batches of {batch}")
    if device == "cpu" and cfg.forward_dtype != "float32":
        gc.log(f"  note: {cfg.forward_dtype} on a CPU is usually several times slower than --dtype float32")
    # the recursion analysis asks for the latents inside each step (its parameter `cycles`: H or L)
    cycles = next((params[m.NAME].cycles for m in selected if getattr(m, "NEEDS_CYCLES", False)), None)
    freeze_loaded()
    with timer("probe"):
        ev, trace = run_trm(subject, split.inputs[rows], split.labels[rows], split.puzzle_identifiers[rows], rows, keep,
                            device, batch, progress=gc.make_progress("puzzles"), cycles=cycles)
    if n_eval:
        trace.eval = ev.head(n_eval)
        trace.eval.info = {k: v for k, v in evaluation.items() if k != "puzzles"}
    else:
        evaluation = {**evaluation, "puzzles": 0}

    sections, metrics = [], {}
    for mod in selected:
        with timer("analyses"):
            data = mod.compute(trace, params[mod.NAME])
            if hasattr(mod, "metrics"):
                metrics.update(mod.metrics(data))
        with timer("figures"):
            figs = mod.figures(data, params[mod.NAME])
        sections.append({"name": mod.NAME, "title": mod.TITLE, "anchor": mod.NAME.replace("_", "-"), "data": data,
                         "figures": figs})
    from ..probes.trm import TRACE_ARRAYS

    meta = report_meta(ref, sha, subject, data_dir, data_how, opts, idx, device, metrics, sections)
    meta["evaluation"] = evaluation
    ctx = report_context(meta, subject, sections, TRACE_ARRAYS, trace)
    return Gathered(meta, ctx, trace, sections)


def plan_evaluation(n_split: int, requested: int | None, cap: int, where: str) -> dict:
    """Which puzzles the metrics run over: the first `requested` of the split, or with --eval all the whole
    split up to `cap` (then `capped` says so, and the report states it)."""
    if requested is not None and requested > n_split:
        raise ReportgenError(f"{where}: --eval {requested} is larger than the split ({n_split} puzzles)")
    n = min(n_split, cap) if requested is None else requested
    return {"puzzles": int(n), "split_puzzles": int(n_split), "requested": "all" if requested is None else int(requested),
            "cap": int(cap), "capped": requested is None and n_split > cap, "selection": "first"}


def report_meta(ref, sha, subject, data_dir, data_how, opts, idx, device, metrics, sections) -> dict:
    import torch

    cfg = subject.config
    return {
        "run": ref.run,
        "name": ref.name,
        "step": ref.step,
        "path": f"{ref.run}/{ref.name}/",
        "kind": "trm",
        "checkpoint": {"path": str(ref.path), "sha256": sha, "bytes": ref.bytes,
                       "config": str(subject.config_path) if subject.config_path else None},
        "dataset": {"path": str(data_dir), "found_by": data_how, "split": opts.split,
                    "puzzle_indices": [int(i) for i in idx], "selection": opts.select,
                    "seed": opts.seed if opts.select == "random" else None},
        "compute": {"device": device, "dtype": cfg.forward_dtype, "trained_dtype": subject.trained_dtype,
                    "act_steps": cfg.halt_max_steps},
        "analyses": [s["name"] for s in sections],
        "metrics": metrics,
        "versions": {"reportgen": __version__, "torch": torch.__version__.split("+")[0]},
    }


def report_context(meta, subject, sections, trace_arrays, trace) -> dict:
    cfg = subject.config
    config_rows = [(k, v, cfg.sources.get(k, "")) for k, v in cfg.to_dict().items()]
    if meta["compute"]["dtype"] != meta["compute"]["trained_dtype"]:
        config_rows = [(k, f"{v} (checkpoint: {meta['compute']['trained_dtype']})" if k == "forward_dtype" else v, s)
                       for k, v, s in config_rows]
    run_rows = [(k, v) for k, v in sorted(subject.run_config.items()) if k != "arch"]
    step = meta["step"]
    title = f"{meta['run']} · step {step}" if step is not None else f"{meta['run']} · {meta['name']}"
    key = f"reportgen:{meta['run']}:{meta['name']}".replace(" ", "_")
    bib = (
        f"@misc{{{key},\n"
        f"  title        = {{{{TRM report: {meta['run']}, {meta['name']}}}}},\n"
        f"  howpublished = {{reportgen {meta['versions']['reportgen']}}},\n"
        f"  note         = {{Checkpoint {Path(meta['checkpoint']['path']).name}, sha256 {meta['checkpoint']['sha256']}; "
        f"{meta['dataset']['split']} split of {Path(meta['dataset']['path']).name}, "
        f"metrics over {meta['evaluation']['puzzles']} puzzles, figures of {len(meta['dataset']['puzzle_indices'])}}}\n}}"
    )
    from ..probes.trm import CYCLE_EVAL_ARRAYS, EVAL_ARRAYS

    shapes = {k: list(v.shape) for k, v in trace.arrays.items()}
    ev_shapes = {k: list(v.shape) for k, v in trace.eval.arrays.items()} if trace.eval is not None else {}
    return {
        "meta": meta, "title": title, "config_rows": config_rows, "run_rows": run_rows, "notes": subject.notes,
        "sections": sections, "trace_arrays": [(k, shapes[k], d) for k, d in trace_arrays.items() if k in shapes],
        "eval_arrays": [(k, ev_shapes[k], d) for k, d in {**EVAL_ARRAYS, **CYCLE_EVAL_ARRAYS}.items() if k in ev_shapes],
        "bibtex": bib, "site_root": "../../", "kind_title": "Tiny Recursive Model report", "config_caption": "as run",
        "trace_note": " of the drawn puzzles (T ACT steps, N puzzles, P prefix positions, D hidden size, V vocabulary; "
                      "token ids as upstream)",
    }
