"""Build options (`BuildOptions`, one field per `reportgen build` flag) and analysis parameters from
`reportgen.toml` (a table per analysis, and `[model]`) and `--param name.key=value` flags (flags win). Unknown
analyses or keys are errors, never silently dropped. Each model kind's own options are a dataclass in its
module (reportgen/kinds), filled from these fields."""
from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ReportgenError

FORMATS = ("html", "pdf")
FIGURE_FORMATS = ("svg", "png", "pdf")
DTYPES = ("float32", "bfloat16", "float16", "config")


@dataclass
class BuildOptions:
    ckpts: list[str]
    out: str = "site"
    data: str | None = None
    split: str = "test"
    samples: int = 5  # puzzles / sequences drawn in the figures (metrics run over --eval)
    eval: str = "all"  # puzzles / sequences the metrics run over: "all" (the whole split, up to the kind's cap) or N
    select: str = "first"
    seed: int = 0
    device: str = "auto"
    dtype: str = "float32"
    only: list[str] | None = None
    formats: list[str] = field(default_factory=lambda: list(FORMATS))
    figure_formats: list[str] = field(default_factory=lambda: ["svg", "png"])  # svg and png are always written
    self_contained: bool = False  # also write report.html with everything inlined
    force: bool = False  # rebuild reports whose inputs have not changed
    jobs: int = 1  # checkpoints built in parallel processes
    executor: str = "none"  # none | slurm | local: one submitit job per checkpoint (cluster.py)
    slurm_partition: str | None = None
    slurm_gpus: int = 0
    slurm_time: int = 60  # minutes
    slurm_cpus: int = 4
    write_index: bool = True  # write the site index (off in the child processes of --jobs)
    config: str | None = None
    params: list[str] = field(default_factory=list)
    threads: int = 0  # torch CPU threads; 0 keeps torch's default
    dpi: int = 200  # PNG resolution of every figure
    max_memory: str = "2GiB"  # budget for activations and batches beyond the model's weights
    quiet: bool = False
    # language-model checkpoints
    vocab: str | None = None  # vocab file, "bytes", or None (vocab.json beside the checkpoint)
    seq_len: int = 0  # tokens per evaluation sequence; 0: min(128, model context)
    max_seqs: int = 256
    mask_rate: float = 0.15  # share of positions masked for a restoration (bidirectional) model
    mask_id: int | None = None  # mask token id when neither the config nor the vocabulary names one
    sae: list[str] = field(default_factory=list)  # SAELens SAE folders (one section of features each)
    prompts: list[str] = field(default_factory=list)  # --prompt texts for the SAE token × feature view
    prompt_files: list[str] = field(default_factory=list)  # --prompt-file: a text file, one prompt
    train_sae: int | None = None  # layer whose resid_post an SAE is trained on (with SAELens)
    sae_arch: str = "topk"
    sae_tokens: int = 200_000
    trust_checkpoint: bool = False  # allow unpickling whole pickled models
    adapter: str | None = None  # FILE.py or module:function building the user's own model (kinds/adapter.py)
    templates: str | None = None  # a folder of templates overriding the shipped ones


# BuildOptions field -> its `reportgen build` flag where the two names differ
_FLAGS = {"ckpts": "--ckpt", "formats": "--format", "params": "--param", "quiet": "--quiet", "prompts": "--prompt",
          "prompt_files": "--prompt-file"}
_MULTIPLE = ("ckpts", "params", "sae", "prompts", "prompt_files")  # repeated flags; other lists are comma-separated


def command_line(opts: BuildOptions, ckpts: list[str], **overrides) -> list[str]:
    """The `reportgen build` argv that builds `ckpts` with the options `opts` holds and `overrides` applied:
    what --jobs processes and submitit jobs run. Every field is passed by its flag (--field-name), so a new
    option is passed on without being listed here (tests/test_build.py parses it back)."""
    import sys

    values = {**dataclasses.asdict(opts), **overrides, "ckpts": list(ckpts)}
    args = [sys.executable, "-m", "reportgen", "build"]
    for f in dataclasses.fields(BuildOptions):
        v = values[f.name]
        if f.name == "write_index":
            args += [] if v else ["--no-index"]
            continue
        flag = _FLAGS.get(f.name, "--" + f.name.replace("_", "-"))
        if isinstance(v, bool):
            args += [flag] if v else []
        elif v is None:
            continue
        elif f.name in _MULTIPLE:
            for item in v:
                args += [flag, str(item)]
        elif isinstance(v, (list, tuple)):
            args += [flag, ",".join(map(str, v))] if v else []
        else:
            args += [flag, str(v)]
    return args


def validate(opts: BuildOptions):
    import analyses

    if opts.split not in ("test", "train"):
        raise ReportgenError(f"--split must be test or train, not {opts.split!r}")
    if opts.select not in ("first", "random"):
        raise ReportgenError(f"--select must be first or random, not {opts.select!r}")
    if opts.dtype not in DTYPES:
        raise ReportgenError(f"--dtype must be one of {', '.join(DTYPES)}, not {opts.dtype!r}")
    if opts.templates and not Path(opts.templates).is_dir():
        raise ReportgenError(f"{opts.templates}: templates folder not found (--templates)")
    if opts.samples < 1:
        raise ReportgenError(f"--samples must be at least 1, not {opts.samples}")
    eval_count(opts)
    memory_budget(opts)
    if not 50 <= opts.dpi <= 1200:
        raise ReportgenError(f"--dpi must be between 50 and 1200, not {opts.dpi}")
    if opts.mask_id is not None and opts.mask_id < 0:
        raise ReportgenError(f"--mask-id must be a token id >= 0, not {opts.mask_id}")
    if not 0 < opts.mask_rate < 1:
        raise ReportgenError(f"--mask-rate must be between 0 and 1, not {opts.mask_rate}")
    if opts.seq_len < 0 or opts.max_seqs < 1:
        raise ReportgenError("--seq-len must be >= 0 (0: automatic) and --max-seqs >= 1")
    if opts.sae and opts.train_sae is not None:
        raise ReportgenError("pass either --sae DIR or --train-sae LAYER, not both")
    if opts.executor not in ("none", "slurm", "local"):
        raise ReportgenError(f"--executor must be none, slurm or local, not {opts.executor!r}")
    if opts.sae_arch not in ("topk", "standard"):
        raise ReportgenError(f"--sae-arch must be topk or standard, not {opts.sae_arch!r}")
    for folder in opts.sae:
        if not Path(folder).is_dir():
            raise ReportgenError(f"{folder}: SAE folder not found (--sae)")
    if len(set(opts.sae)) < len(opts.sae):
        raise ReportgenError(f"--sae {next(f for f in opts.sae if opts.sae.count(f) > 1)}: the same SAE is passed twice")
    for f in opts.prompt_files:
        if not Path(f).is_file():
            raise ReportgenError(f"{f}: prompt file not found (--prompt-file)")
    if (opts.prompts or opts.prompt_files) and not (opts.sae or opts.train_sae is not None):
        raise ReportgenError("--prompt and --prompt-file show SAE features: pass --sae DIR or --train-sae LAYER too")
    bad = [f for f in opts.formats if f not in FORMATS]
    if bad or not opts.formats:
        raise ReportgenError(f"--format takes a list of {', '.join(FORMATS)}, not {','.join(opts.formats)!r}")
    bad = [f for f in opts.figure_formats if f not in FIGURE_FORMATS]
    if bad:
        raise ReportgenError(f"--figure-formats takes a list of {', '.join(FIGURE_FORMATS)}, not {','.join(opts.figure_formats)!r}")
    names = list(analyses.REGISTRY)
    if opts.only:
        unknown = [a for a in opts.only if a not in analyses.REGISTRY]
        if unknown:
            raise ReportgenError(f"--only: unknown analysis {', '.join(unknown)} (known: {', '.join(names)})")
    toml, toml_path = read_toml(opts.config)
    model = toml.pop("model", {})
    if not isinstance(model, dict) or set(model) - {"adapter"}:
        raise ReportgenError(f"{toml_path}: [model] takes only adapter = \"FILE.py\" or \"module:function\"")
    if model.get("adapter") and not opts.adapter:  # a file path is relative to the config file
        a = str(model["adapter"])
        opts.adapter = str(toml_path.parent / a) if a.endswith(".py") and not Path(a).is_absolute() else a
    return analysis_params(analyses.REGISTRY, toml, toml_path, opts.params)


def eval_count(opts: BuildOptions) -> int | None:
    """--eval as a number of puzzles / sequences, or None for "all" (the kind applies its cap)."""
    v = str(opts.eval).strip().lower()
    if v == "all":
        return None
    try:
        n = int(v)
    except ValueError:
        raise ReportgenError(f"--eval takes a number of puzzles/sequences or 'all', not {opts.eval!r}") from None
    if n < 1:
        raise ReportgenError(f"--eval must be at least 1 (or 'all'), not {n}")
    return n


_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "kib": 2**10, "m": 1e6, "mb": 1e6, "mib": 2**20, "g": 1e9, "gb": 1e9,
          "gib": 2**30}


def memory_budget(opts: BuildOptions) -> int:
    """--max-memory in bytes ("2GiB", "1.5GB", "800MiB", a plain number of bytes)."""
    import re

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(opts.max_memory))
    unit = m.group(2).lower() if m else ""
    if not m or unit not in _UNITS:
        raise ReportgenError(f"--max-memory takes a size such as 2GiB, 1500MB or 800MiB, not {opts.max_memory!r}")
    n = int(float(m.group(1)) * _UNITS[unit])
    if n < 64 * 2**20:
        raise ReportgenError(f"--max-memory must be at least 64MiB, not {opts.max_memory!r}")
    return n





def read_toml(path: str | Path | None) -> tuple[dict, Path | None]:
    """The config file given, or ./reportgen.toml when present; ({}, None) when there is none."""
    if path is None:
        p = Path("reportgen.toml")
        if not p.is_file():
            return {}, None
    else:
        p = Path(path)
        if not p.is_file():
            raise ReportgenError(f"{p}: config file not found")
    try:
        return tomllib.loads(p.read_text()), p
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ReportgenError(f"{p}: not valid TOML ({e})") from None


def _convert(text: str, like, where: str):
    if isinstance(like, bool):
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ReportgenError(f"{where}: expected true or false, not {text!r}")
    for typ in (int, float):
        if isinstance(like, typ):
            try:
                return typ(text)
            except ValueError:
                raise ReportgenError(f"{where}: expected a {typ.__name__}, not {text!r}") from None
    return text


def analysis_params(registry: dict, toml: dict, toml_path: Path | None, flags: list[str]) -> dict:
    """Validated Params instance per analysis name."""
    tables: dict[str, dict] = {}
    for name, table in toml.items():
        if name not in registry:
            raise ReportgenError(f"{toml_path}: unknown analysis table [{name}] (known: {', '.join(registry)})")
        if not isinstance(table, dict):
            raise ReportgenError(f"{toml_path}: [{name}] must be a table")
        tables[name] = dict(table)
    for flag in flags:
        key, sep, value = flag.partition("=")
        name, dot, field = key.partition(".")
        if not sep or not dot:
            raise ReportgenError(f"--param {flag!r}: expected ANALYSIS.KEY=VALUE")
        if name not in registry:
            raise ReportgenError(f"--param {flag!r}: unknown analysis {name!r} (known: {', '.join(registry)})")
        defaults = {f.name: f.default for f in dataclasses.fields(registry[name].Params)}
        if field not in defaults:
            raise ReportgenError(f"--param {flag!r}: {name} has no parameter {field!r} (known: {', '.join(defaults)})")
        tables.setdefault(name, {})[field] = _convert(value, defaults[field], f"--param {flag}")
    out = {}
    for name, mod in registry.items():
        table = tables.get(name, {})
        known = {f.name for f in dataclasses.fields(mod.Params)}
        extra = sorted(set(table) - known)
        if extra:
            raise ReportgenError(f"{toml_path}: [{name}] has unknown key(s) {', '.join(extra)} (known: {', '.join(sorted(known))})")
        try:
            out[name] = mod.Params(**table)
        except (TypeError, ValueError) as e:
            raise ReportgenError(f"{toml_path or '--param'}: [{name}] {e}") from None
    return out
