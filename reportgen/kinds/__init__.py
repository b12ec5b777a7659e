"""Model kinds, registered by name like the analyses.

A kind is one module that answers, for the checkpoints of one format:

- `NAME`, `DESCRIPTION` (one line for `reportgen list`), `SUBJECT` (the subject family its analyses are
  registered for: "trm" or "lm"), `Options` (a dataclass of the build options it reads; the cache digest
  covers exactly these), and the header partial `templates/headers/<NAME>.html`;
- `sniff(path) -> bool`: is this checkpoint (a file or a folder) of this kind? Cheap, and without importing
  torch, so that up-to-date reports are skipped before any heavy import;
- `inputs(ref, opts) -> list[Path]`: the files besides the checkpoint whose bytes the report depends on;
- `check(ref, opts)`: option errors a build can report before any model runs (optional);
- `resolve(spec) -> Path | CheckpointRef | None`: a checkpoint for a --ckpt that is no path (optional; the
  `hf` kind finds model ids in the local Hugging Face cache);
- `gather(job, opts, params, ctx) -> Gathered`: load the subject, run the probe for the needs the chosen
  analyses declare, run the analyses, and describe the report (meta, page context).

`SNIFF_ORDER` is the order kinds are asked in; a kind from another installed package joins through the
`reportgen.kinds` entry point group (its module object) and is asked after the built-in ones. The
`adapter` kind is never sniffed: it runs user code, so only `--adapter` (or `[model] adapter` in
reportgen.toml) selects it.
"""
from __future__ import annotations

from contextlib import contextmanager

import importlib
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ReportgenError

BUILTIN = ("trm", "lm", "hf", "adapter")  # modules of this package, in sniffing order


_GC = {"deferred": False, "froze": False}


@contextmanager
def collection_deferred(unfreeze: bool = True):
    """The cyclic garbage collector off while a build imports torch and loads the models and data. With
    TransformerLens and SAELens loaded there are about 5*10^5 long-lived objects, and every full collection walks
    all of them (on the SAE example, eight such collections took 1.1 s while it loaded). `freeze_loaded` turns the
    collector back on before the probe, with those objects frozen, so the collections the analyses cause walk only
    what they make. On leaving, the objects are unfrozen and the collector is back as it was: a process that goes
    on (`reportgen watch`, a notebook calling reportgen.build) collects their garbage later as usual. With
    unfreeze=False (the command line, which exits next) they stay frozen, and the interpreter's last collection
    at exit skips them (it took about 0.4 s). A process that manages its collector itself (disabled or frozen
    already) is left alone."""
    import gc

    if not gc.isenabled() or gc.get_freeze_count():
        yield
        return
    _GC.update(deferred=True, froze=False)
    gc.disable()
    try:
        yield
    finally:
        if _GC["froze"] and unfreeze:
            gc.unfreeze()
        _GC.update(deferred=False, froze=False)
        gc.enable()


def freeze_loaded() -> None:
    """Just before a probe, inside `collection_deferred`: freeze what is alive now and turn the collector back on."""
    import gc

    if _GC["deferred"]:
        gc.freeze()
        _GC["froze"] = True
        gc.enable()


@dataclass
class Gathered:
    """Everything a report shows, gathered before anything is written (build.py hands it to the writer)."""

    meta: dict  # data/report.json
    context: dict  # the page's template context
    trace: object  # has .save(path) -> data/trace.npz; TRM traces also carry .eval (data/eval.npz)
    sections: list  # {"name", "title", "anchor", "data", "figures"} per analysis, in report order
    extra_dirs: dict = field(default_factory=dict)  # report-relative folder name -> a temporary folder moved in


@dataclass
class GatherContext:
    """What a kind's gather gets from the build besides options and params."""

    device: str
    timer: object  # log.Timer
    log: object  # callable(str)
    progress: object = None  # callable(done, total) | None; made by progress(what)
    make_progress: object = None  # callable(what) -> progress callable or None


_loaded: dict | None = None


def registry() -> dict:
    """name -> kind module: the built-in kinds, then those of installed plugins (entry points)."""
    global _loaded
    if _loaded is None:
        kinds = {name: importlib.import_module(f"{__name__}.{name}") for name in BUILTIN}
        for ep in _entry_points("reportgen.kinds"):
            try:
                mod = ep.load()
            except Exception as e:  # noqa: BLE001 - a broken plugin is named, not a traceback
                raise ReportgenError(f"kind plugin {ep.name} ({ep.value}) cannot be imported: {e}") from None
            _check_kind(mod, ep.name)
            kinds.setdefault(mod.NAME, mod)
        _loaded = kinds
    return _loaded


def _entry_points(group: str):
    from importlib.metadata import entry_points

    return list(entry_points(group=group))


REQUIRED = ("NAME", "DESCRIPTION", "SUBJECT", "Options", "sniff", "inputs", "gather")


def _check_kind(mod, where: str) -> None:
    missing = [a for a in REQUIRED if not hasattr(mod, a)]
    if missing:
        raise ReportgenError(f"kind plugin {where}: module {mod.__name__} lacks {', '.join(missing)}")


def get(name: str):
    kinds = registry()
    if name not in kinds:
        raise ReportgenError(f"unknown model kind {name!r} (known: {', '.join(kinds)})")
    return kinds[name]


def known_text() -> str:
    """The kinds reportgen knows, for the error on an unknown checkpoint."""
    return ", ".join(m.DESCRIPTION for m in registry().values() if getattr(m, "SNIFFED", True))


def detect(path: Path):
    """The kind module whose sniff claims `path`, or None."""
    for mod in registry().values():
        if getattr(mod, "SNIFFED", True) and mod.sniff(path):
            return mod
    return None


def resolve(spec: str):
    """A checkpoint that a kind finds for a --ckpt that is not a path (a model id in the local Hugging Face
    cache): a Path or a CheckpointRef, or None."""
    for mod in registry().values():
        if hasattr(mod, "resolve"):
            found = mod.resolve(spec)
            if found is not None:
                return found
    return None


def options(mod, opts):
    """The kind's Options dataclass filled from the build options of the same names (the rest keep defaults)."""
    import dataclasses

    return mod.Options(**{f.name: getattr(opts, f.name) for f in dataclasses.fields(mod.Options) if hasattr(opts, f.name)})


def sniff_kind(path: Path) -> str:
    """The name of the kind that claims `path`, or 'unknown'."""
    mod = detect(Path(path))
    return mod.NAME if mod is not None else "unknown"


def unknown_checkpoint(path: Path) -> ReportgenError:
    """The error for a checkpoint of no kind reportgen knows (one that cannot be read says that instead)."""
    from ..checkpoints import _torch_load

    if path.is_file():
        _torch_load(path)  # an unreadable file says why
    return ReportgenError(f"{path}: not a checkpoint reportgen knows ({known_text()}); for your own model, "
                          f"pass --adapter FILE.py")


def discover(specs: list[str]) -> list:
    """checkpoints.discover, with the folders and model ids the kinds claim."""
    from ..checkpoints import discover as _discover

    return _discover(specs, detect=lambda p: detect(p) is not None, resolve=resolve)


class Unclaimed:
    """The kind of a checkpoint no kind claims: building it raises `unknown_checkpoint` (which says why when
    the file cannot be read at all)."""

    NAME = "unknown"

    @staticmethod
    def gather(job, opts, params, gc):
        raise unknown_checkpoint(job.ref.path)
