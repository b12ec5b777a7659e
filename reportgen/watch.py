"""`reportgen watch RUN_DIR`: build each checkpoint that appears in a run folder while it trains.

Every `interval` seconds the run folder is listed. A checkpoint (a `step_N` / `checkpoint-N` /
`epoch=E-step=N.ckpt` file or folder, or a `*.pt` / `*.pth` / `*.ckpt` file) counts as complete once its size and
modification time (of every file, for a folder) are the same in two consecutive polls; hidden names and the
temporary names writers use while a file is not finished (`*.tmp`, `*.partial`, `*.part`, `tmp-checkpoint-N`, ...)
are never built. Each complete checkpoint is built on its own through the same path as
`reportgen build --ckpt PATH` (`build.run_build`, so a report whose inputs are unchanged is skipped by its
digest), then the site index and the run's overview are rewritten once per poll. A checkpoint that fails prints
its one error line and is retried only when its files change.

No torch at module level: the first build imports it.
"""
from __future__ import annotations

import dataclasses
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .checkpoints import STEP_RE, make_ref
from .errors import ReportgenError, first_line

SUFFIXES = (".pt", ".pth", ".ckpt")  # named checkpoint files (best_model.pt), as a run folder's discovery takes
# names a writer uses before its file is complete (torch.save to a temporary name then os.replace, downloads,
# the Hugging Face Trainer's tmp-checkpoint-N folder, editors' backups)
UNFINISHED = re.compile(r"(\.(tmp|temp|partial|part|swp|lock|crdownload)$)|(\.tmp[-.~_]?\w*$)|(^tmp[-_])|(~$)", re.I)


def is_candidate(path: Path) -> bool:
    """Could `path` (an entry of the run folder) be a checkpoint once complete? Hidden and temporary names never."""
    name = path.name
    if name.startswith(".") or UNFINISHED.search(name):
        return False
    if STEP_RE.match(name):
        return path.is_file() or path.is_dir()
    return path.is_file() and path.suffix in SUFFIXES


def signature(path: Path):
    """What must stay the same over two polls for `path` to count as complete: a file's (size, mtime); a folder's
    sorted (name, size, mtime) of every file inside that is not hidden. None when it vanished or is empty."""
    try:
        if path.is_dir():
            sig = []
            for q in sorted(path.rglob("*")):
                rel = q.relative_to(path)
                if any(p.startswith(".") for p in rel.parts) or not q.is_file():
                    continue
                if any(UNFINISHED.search(p) for p in rel.parts):
                    return None  # a file inside is still being written under a temporary name
                st = q.stat()
                sig.append((str(rel), st.st_size, st.st_mtime_ns))
            return tuple(sig) or None
        st = path.stat()
        return (st.st_size, st.st_mtime_ns) if st.st_size else None
    except OSError:
        return None


@dataclass
class Watcher:
    """The state of one watched run folder across polls: what each entry looked like at the last poll and
    what was built (or failed) at which signature."""

    run_dir: Path
    seen: dict = field(default_factory=dict)  # path -> signature at the previous poll
    done: dict = field(default_factory=dict)  # path -> signature it was built (or failed) at

    def poll(self) -> tuple[list[Path], list[Path]]:
        """(complete checkpoints not yet built at their current signature, in step order; those still changing)."""
        try:
            entries = [p for p in self.run_dir.iterdir() if is_candidate(p)]
        except OSError:
            entries = []
        now = {p: signature(p) for p in entries}
        ready, growing = [], []
        for p, sig in now.items():
            if sig is None or self.done.get(p) == sig:
                continue
            (ready if self.seen.get(p) == sig else growing).append(p)
        self.seen = now
        key = lambda p: (make_ref(p).step if make_ref(p).step is not None else -1, p.name)  # noqa: E731
        return sorted(ready, key=key), sorted(growing, key=key)

    def mark(self, path: Path) -> None:
        self.done[path] = self.seen.get(path)


def say(opts, msg: str) -> None:
    if not opts.quiet:
        print(msg, file=sys.stderr, flush=True)


def build_each(paths: list[Path], opts, debug: bool = False, timer=None) -> tuple[list[Path], list[str]]:
    """Build each checkpoint on its own with `opts` (as `reportgen build --ckpt PATH`, without the site index):
    (report folders written now, one error line per checkpoint that failed)."""
    from .build import run_build

    built, errors = [], []
    for p in paths:
        t0 = time.time()
        try:
            folders = run_build(dataclasses.replace(opts, ckpts=[str(p)], write_index=False), timer)
        except ReportgenError as e:
            if debug:
                raise
            errors.append(f"reportgen: error: {e}")
        except Exception as e:  # noqa: BLE001 - one bad checkpoint never stops the watch
            if debug:
                raise
            errors.append(f"reportgen: error: {p}: {type(e).__name__}: {first_line(e, 200)}")
        else:  # a report installed by this call (not one skipped as up to date) is newer than t0
            built += [f for f in folders if _mtime(f / "data" / "report.json") >= t0]
            continue
        print(errors[-1], file=sys.stderr, flush=True)
    return built, errors


def _mtime(p: Path) -> float:
    try:
        return p.stat().st_mtime
    except OSError:
        return 0.0


def update_site(opts, run: str, changed: bool) -> None:
    """The site index and manifest, and the run's overview when a report of it was built (as `build` does)."""
    from ._version import __version__
    from .site import write_site

    write_site(Path(opts.out), __version__, {run} if changed else set(), pdf="pdf" in opts.formats, dpi=opts.dpi)


def watch(run_dir: Path, opts, interval: float = 30.0, once: bool = False, debug: bool = False,
          timings: bool = False, sleep=time.sleep) -> int:
    """Poll `run_dir` and build what completes; with `once`, two polls `interval` apart, then exit. `timings`:
    after each poll that built something, the time spent per phase so far as JSON on stderr (as build's --timings).
    Returns the exit code: 2 when `once` and a checkpoint failed, else 0. Raises ReportgenError on bad options
    or a run folder that is a file (or, with `once`, missing)."""
    from .build import check_out
    from .heap import release_freed_memory
    from .checkpoints import safe_name
    from .log import Timer
    from .config import validate
    from .render import set_templates

    if interval < 0:
        raise ReportgenError(f"--interval must be >= 0 seconds, not {interval}")
    if run_dir.exists() and not run_dir.is_dir():
        raise ReportgenError(f"{run_dir}: not a folder (watch takes the run folder the checkpoints are saved in)")
    if once and not run_dir.is_dir():
        raise ReportgenError(f"{run_dir}: run folder not found")
    set_templates(opts.templates)
    validate(dataclasses.replace(opts))  # bad options fail now, not at the first checkpoint
    check_out(Path(opts.out))
    run = safe_name(run_dir.resolve().name)
    w = Watcher(run_dir)
    if not once:
        say(opts, f"watching {run_dir} every {interval:g} s; reports in {opts.out} (Ctrl-C stops)")
    if not run_dir.is_dir():
        say(opts, f"{run_dir} does not exist yet; waiting for it")
    failed = False
    timer = Timer()
    w.poll()
    while True:
        sleep(interval)
        ready, growing = w.poll()
        if ready:
            built, errors = build_each(ready, opts, debug, timer)
            release_freed_memory()  # the heap kept for the builds' batches (heap.reuse_freed_memory) goes back
            for p in ready:
                w.mark(p)  # built, up to date, or failed: not again until its files change
            failed |= bool(errors)
            if opts.write_index and len(errors) < len(ready):  # something is in the site (built now or up to date)
                with timer("site"):
                    update_site(opts, run, changed=bool(built))
            if timings:
                import json

                print(json.dumps({k: round(v, 4) for k, v in timer.phases.items()}), file=sys.stderr, flush=True)
        if once:
            for p in growing:
                say(opts, f"not complete yet (still changing between polls): {p}")
            return 2 if failed else 0
