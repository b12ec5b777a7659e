"""Command line: `reportgen build`. Heavy modules are imported inside the commands, so --help is instant."""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import click

from ._version import __version__


def _split_list(ctx, param, value):
    if value is None:
        return None
    items = [v.strip() for v in value.split(",") if v.strip()]
    return items


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="reportgen")
def main():
    """Publication-style HTML and PDF reports for model checkpoints.

    \b
    Example (the shipped TRM Sudoku run):
      reportgen build --ckpt examples/sudoku/checkpoints/trm_sudoku_easy/ --out site/
    """


# `reportgen build --help` in sections, each with an example
HELP_SECTIONS = (
    ("Inputs", ("ckpts", "data", "adapter", "config", "params", "only"),
     "reportgen build --ckpt checkpoints/run/ --out site/ --param sudoku_latents.method=cosine"),
    ("Evaluation", ("eval_", "samples", "select", "seed", "device", "dtype", "threads", "max_memory"),
     "reportgen build --ckpt run/step_65100 --data data/sudoku-extreme --eval all --samples 8 --device cuda"),
    ("TRM (Sudoku)", ("split",),
     "reportgen build --ckpt run/step_65100 --data data/sudoku-extreme-1k-aug-1000 --split test"),
    ("Language models and SAEs", ("vocab", "seq_len", "max_seqs", "mask_rate", "mask_id", "sae", "prompts", "prompt_files", "train_sae",
                                  "sae_arch", "sae_tokens", "trust_checkpoint"),
     "reportgen build --ckpt model.pt --data eval.txt --vocab vocab.json --mask-id 4 --sae sae/blocks.2.hook_resid_post"),
    ("Output", ("out", "formats", "figure_formats", "dpi", "self_contained", "templates", "force"),
     "reportgen build --ckpt run/ --out site/ --format html,pdf --figure-formats svg,png,pdf --dpi 300"),
    ("Cluster and parallel builds", ("jobs", "executor", "slurm_partition", "slurm_gpus", "slurm_time", "slurm_cpus"),
     "reportgen build --ckpt 'runs/*/step_*' --executor slurm --slurm-partition gpu --slurm-gpus 1"),
)


class SectionedCommand(click.Command):
    """A command whose --help lists its options in HELP_SECTIONS, each section with an example."""

    sections = HELP_SECTIONS

    def format_options(self, ctx, formatter):
        by_name = {p.name: p for p in self.get_params(ctx)}
        shown = set()
        for title, names, example in self.sections:
            rows = [r for n in names if n in by_name and (r := by_name[n].get_help_record(ctx))]
            shown.update(names)
            with formatter.section(title):
                formatter.write_dl(rows)
                formatter.write(f"\n{'':{formatter.current_indent}}e.g. {example}\n")
        rest = [r for p in self.get_params(ctx) if p.name not in shown and (r := p.get_help_record(ctx))]
        if rest:
            with formatter.section("Other"):
                formatter.write_dl(rest)


# the options of `reportgen build` (all but --ckpt), shared with `reportgen watch`
BUILD_OPTIONS = (
    click.option("--data", metavar="PATH", help="TRM: dataset folder in the upstream layout. Language models: a UTF-8 "
                 "text file, a .npy/.pt token array [n_seq, ctx] or a datasets folder (save_to_disk). "
                 "[default: all_config.yaml's data_paths, resolved against the working directory]"),
    click.option("--split", type=click.Choice(["test", "train"]), default="test", show_default=True,
                 help="Dataset split to draw puzzles from."),
    click.option("--samples", type=int, default=5, show_default=True,
                 help="Puzzles (TRM) drawn in the figures; metrics are computed over --eval."),
    click.option("--eval", "eval_", default="all", show_default=True, metavar="N|all",
                 help="Puzzles or sequences the metrics are computed over: the whole split / --data (up to a cap the "
                 "report states; language models: 262,144 tokens' worth of sequences), or the first N."),
    click.option("--select", type=click.Choice(["first", "random"]), default="first", show_default=True,
                 help="Take the first N puzzles of the split, or N at random (see --seed)."),
    click.option("--seed", type=int, default=0, show_default=True,
                 help="Seed for --select random and for the positions a masked language model sees masked."),
    click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
                 help="auto uses CUDA when present."),
    click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16", "config"]), default="float32",
                 show_default=True, help="Compute dtype. TRM: float32, or the checkpoint's forward_dtype (config; "
                 "bfloat16 upstream). Language models: float32, bfloat16 or float16 (a 1B model in half the memory)."),
    click.option("--only", callback=_split_list, metavar="A,B",
                 help="Analyses to run (default: all that apply). TRM: sudoku_latents, step_evolution, solving_stats; "
                 "language models: attention, predictions, gradient_flow, token_map, sae_features."),
    click.option("--format", "formats", callback=_split_list, default="html,pdf", show_default=True, metavar="html,pdf",
                 help="Outputs per report."),
    click.option("--figure-formats", "figure_formats", callback=_split_list, default="svg,png", show_default=True,
                 metavar="svg,png,pdf", help="Files per figure; pdf adds a standalone vector PDF (TrueType fonts) for LaTeX."),
    click.option("--self-contained", "self_contained", is_flag=True,
                 help="Also write report.html with figures and styles inlined and no external reference (mail it, open a CI artifact in one click)."),
    click.option("--jobs", "-j", type=click.IntRange(min=1), default=1, show_default=True,
                 help="Build checkpoints in this many parallel processes (each also lays out its PDFs in a second "
                 "process, so use up to about half the cores)."),
    click.option("--executor", type=click.Choice(["none", "slurm", "local"]), default="none", show_default=True,
                 help="slurm: one SLURM job per checkpoint through submitit (local: the same jobs as local processes); "
                 "the site index is written when all finish."),
    click.option("--slurm-partition", "slurm_partition", metavar="NAME", help="--executor slurm: partition."),
    click.option("--slurm-gpus", "slurm_gpus", type=click.IntRange(min=0), default=0, show_default=True,
                 help="--executor slurm: GPUs per job."),
    click.option("--slurm-time", "slurm_time", type=click.IntRange(min=1), default=60, show_default=True,
                 help="--executor slurm: time limit per job in minutes."),
    click.option("--slurm-cpus", "slurm_cpus", type=click.IntRange(min=1), default=4, show_default=True,
                 help="--executor slurm/local: CPUs per job (also its torch threads)."),
    click.option("--no-index", "no_index", is_flag=True, hidden=True),
    click.option("--force", is_flag=True, help="Rebuild reports whose inputs have not changed (they are skipped otherwise)."),
    click.option("--dpi", type=click.IntRange(50, 1200), default=200, show_default=True,
                 help="Resolution of the PNG figures (the PDF embeds them)."),
    click.option("--out", default="site", show_default=True, metavar="DIR", help="Output (site) folder."),
    click.option("--config", metavar="FILE", help="reportgen.toml with a table per analysis [default: ./reportgen.toml if present]."),
    click.option("--param", "params", multiple=True, metavar="A.KEY=VALUE",
                 help="Analysis parameter, e.g. sudoku_latents.method=cosine. Repeatable; wins over --config."),
    click.option("--threads", type=click.IntRange(min=0), default=0, show_default=True,
                 help="CPU threads for torch (0: torch's default). 1 is fastest for small models on a busy machine."),
    click.option("--max-memory", "max_memory", default="2GiB", show_default=True, metavar="SIZE",
                 help="Memory for activations and batches beyond the model's weights (e.g. 1GiB, 800MB)."),
    click.option("--vocab", metavar="FILE|bytes", help="Language models: token strings (JSON id -> string), or 'bytes' "
                 "for byte-level ids. [default: vocab.json beside the checkpoint, else #id]"),
    click.option("--seq-len", "seq_len", type=click.IntRange(min=0), default=0, show_default=True,
                 help="Language models: tokens per evaluation sequence (0: min(128, model context))."),
    click.option("--max-seqs", "max_seqs", type=click.IntRange(min=1), default=256, show_default=True,
                 help="Language models: sequences the activation analyses read (attention entropy, SAE codes, the "
                 "drawn samples); the loss and accuracy run over --eval."),
    click.option("--mask-rate", "mask_rate", type=float, default=0.15, show_default=True,
                 help="Masked (restoration) models: share of positions replaced by the mask token (seeded by --seed)."),
    click.option("--mask-id", "mask_id", type=click.IntRange(min=0), metavar="ID",
                 help="Masked models: the mask token id, when neither the config (mask_token_id) nor the vocabulary names one."),
    click.option("--sae", metavar="DIR", multiple=True, help="An SAE or transcoder in SAELens' on-disk layout (cfg.json + "
                 "sae_weights.safetensors); repeat for several (e.g. one per layer), shown side by side."),
    click.option("--prompt", "prompts", metavar="TEXT", multiple=True,
                 help="SAEs: a prompt whose tokens get the features firing most on them (a token × feature view); repeatable."),
    click.option("--prompt-file", "prompt_files", metavar="FILE", multiple=True,
                 help="SAEs: a UTF-8 text file holding one prompt (as --prompt); repeatable."),
    click.option("--train-sae", "train_sae", type=int, metavar="LAYER",
                 help="Train an SAE with SAELens on blocks.LAYER.hook_resid_post of the evaluation data; saved in the report's sae/."),
    click.option("--sae-arch", "sae_arch", type=click.Choice(["topk", "standard"]), default="topk", show_default=True,
                 help="--train-sae architecture: TopK (k=16) or standard (L1)."),
    click.option("--sae-tokens", "sae_tokens", type=click.IntRange(min=1000), default=200_000, show_default=True,
                 help="--train-sae training tokens."),
    click.option("--trust-checkpoint", "trust_checkpoint", is_flag=True,
                 help="Allow unpickling a whole pickled model (runs code from the file; only for files you trust)."),
    click.option("--adapter", metavar="FILE.py|MODULE:FUNCTION",
                 help="Your own PyTorch model: a function that builds it from the checkpoint and says how to read it "
                 "(see the README's adapter protocol). Runs your code, so only when named here or in reportgen.toml [model]."),
    click.option("--templates", metavar="DIR", help="A folder of Jinja templates that override reportgen's own, file by file."),
    click.option("--timings", is_flag=True, help="Print the time spent per phase as JSON on stderr at the end."),
    click.option("-q", "--quiet", is_flag=True, help="No progress on stderr."),
    click.option("--debug", is_flag=True, help="Show the traceback of an error."),
)


def build_options(f):
    """Apply BUILD_OPTIONS to a command function."""
    for opt in reversed(BUILD_OPTIONS):
        f = opt(f)
    return f


@main.command(cls=SectionedCommand)
@click.option("--ckpt", "ckpts", multiple=True, required=True, metavar="PATH",
              help="A checkpoint file (TRM step_N, or a language model .pt), a run folder (every step_N in it) or a glob. Repeatable.")
@build_options
def build(timings, debug, eval_, no_index, **kw):
    """Build a report (HTML + PDF) for each checkpoint and update the site index in --out."""
    with _one_line_errors(debug, "reportgen: interrupted; finished reports are kept, unfinished ones were discarded", 130):
        from .build import BuildOptions, Timer, run_build  # noqa: F401
        from .heap import reuse_freed_memory

        reuse_freed_memory()
        timer = Timer()
        run_build(_options(kw, eval_, no_index), timer, exiting=True)
        if timings:
            import json

            click.echo(json.dumps({k: round(v, 4) for k, v in timer.phases.items()}), err=True)


@contextlib.contextmanager
def _one_line_errors(debug: bool, interrupted: str, interrupted_code: int):
    """A ReportgenError is one line on stderr and exit 2 (--debug: its traceback); Ctrl-C prints `interrupted`."""
    from .errors import ReportgenError

    try:
        yield
    except ReportgenError as e:
        if debug:
            raise
        click.echo(f"reportgen: error: {e}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo(interrupted, err=True)
        sys.exit(interrupted_code)


def _options(kw: dict, eval_: str, no_index: bool):
    """BuildOptions from the values of a command's BUILD_OPTIONS (and --ckpt)."""
    from .config import BuildOptions

    kw["formats"], kw["figure_formats"] = kw["formats"] or [], kw["figure_formats"] or []
    return BuildOptions(eval=eval_, write_index=not no_index, **{k: list(v) if isinstance(v, tuple) else v for k, v in kw.items()})


class WatchCommand(SectionedCommand):
    sections = (("Watching", ("run_dir", "interval", "once"),
                 "reportgen watch checkpoints/my-run/ --out site/ --interval 60 --data data/sudoku-extreme"),) + HELP_SECTIONS


@main.command(cls=WatchCommand)
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--interval", type=click.FloatRange(min=0), default=30.0, show_default=True, metavar="SECONDS",
              help="Seconds between polls of RUN_DIR (fractions allowed). A checkpoint counts as complete when its "
              "size and modification time are the same in two consecutive polls.")
@click.option("--once", is_flag=True, help="Build the checkpoints that are complete now (two polls --interval apart) "
              "and exit: 0, or 2 if any failed.")
@build_options
def watch(run_dir, interval, once, timings, debug, eval_, no_index, **kw):
    """Build a report for each checkpoint that appears in RUN_DIR while it trains, with the build options below.

    Polls RUN_DIR every --interval seconds; each complete new checkpoint (step_N, checkpoint-N, *.ckpt, *.pt; never
    hidden or temporary names such as *.tmp, *.partial) is built as `reportgen build --ckpt PATH` builds it, and the
    site index and the run's overview are kept current. A checkpoint that fails prints its error and watching goes
    on. Ctrl-C stops."""
    with _one_line_errors(debug, f"stopped watching {run_dir}", 0):
        from .heap import reuse_freed_memory
        from .watch import watch as run_watch

        reuse_freed_memory()
        code = run_watch(run_dir, _options({**kw, "ckpts": []}, eval_, no_index), interval=interval, once=once,
                         debug=debug, timings=timings)
    sys.exit(code)


@main.command("list")
def list_():
    """The installed model kinds and analyses, and what each needs."""
    import dataclasses

    from .errors import ReportgenError

    try:
        import analyses

        from . import kinds

        click.echo("Model kinds (--ckpt is detected as the first that claims it; adapter only with --adapter):")
        for name, mod in kinds.registry().items():
            opts = ", ".join(f.name for f in dataclasses.fields(mod.Options))
            click.echo(f"  {name:<10} {mod.DESCRIPTION} [{mod.__name__}]")
            click.echo(f"  {'':<10} analyses for: {mod.SUBJECT}; options: {opts}")
        click.echo("\nAnalyses (--only NAME, --param NAME.KEY=VALUE):")
        for name, mod in analyses.REGISTRY.items():
            params = mod.Params()
            if hasattr(mod, "needs"):
                need = "; ".join(f"{k} {v}" if v else k for k, v in _describe_needs(mod.needs(params)).items())
            else:
                need = "the probe's trace" + (" and the evaluation set" if getattr(mod, "USES_EVAL", False) else "")
            click.echo(f"  {name:<16} {mod.TITLE} (for {', '.join(mod.SUBJECTS)}) [{mod.__name__}]")
            click.echo(f"  {'':<16} needs: {need}")
            click.echo(f"  {'':<16} params: {', '.join(f'{k}={v!r}' for k, v in dataclasses.asdict(params).items())}")
    except ReportgenError as e:
        click.echo(f"reportgen: error: {e}", err=True)
        sys.exit(2)


def _describe_needs(needs: dict) -> dict:
    """Needs as short text (callables, e.g. the vectors a need runs from a layer, by name)."""
    out = {}
    for k, v in needs.items():
        if isinstance(v, dict):
            v = ", ".join(f"{a}={getattr(b, '__name__', b)!s}" for a, b in v.items() if not callable(b) or True)
        out[k] = v
    return out

