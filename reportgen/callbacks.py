"""Reports from inside training: build a checkpoint's report in the background while training goes on.

- `Every(n, out="site", **build_options)` for a plain loop: `hook(step, path_just_saved)` after each save, or
  `hook.save(step, model_or_state_dict, run_dir)` to save `run_dir/step_N.pt` and build it; every `n` steps.
- `Lightning(every=1000, out="site", **build_options)`: a Lightning `Callback`.
- `HuggingFace(every=None, out="site", **build_options)`: a `transformers.TrainerCallback`.

Each build is `python -m reportgen build --ckpt PATH --out OUT ...` (the build options are `reportgen build`'s, by
their BuildOptions names: `data="data/tiny"`, `eval="64"`, `formats=["html"]`, `threads=1`), started with
`subprocess.Popen` so the training step is not held up. At most one build runs at a time: a checkpoint that is due
while one runs is queued (a newer one replaces it) and started when the running one has finished, which the next
call notices; `close()` (also run at exit) waits for what is left. Each finished build prints one line on stderr:
the report built, or its one error line; `results` holds them all.

Nothing here imports torch, Lightning or transformers at module level.
"""
from __future__ import annotations

import atexit
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class BuildResult:
    """One finished build: its step and checkpoint, the build's exit code, its error line (None when it
    succeeded), when it started and finished (time.perf_counter()) and its command line."""

    step: int
    path: Path
    returncode: int
    error: str | None
    started: float
    finished: float
    argv: list

    @property
    def seconds(self) -> float:
        return self.finished - self.started


def _child_env() -> dict:
    """The environment of a build: this one, with the folder this reportgen is imported from first on
    PYTHONPATH when that is a checkout (an installed reportgen is found the usual way)."""
    import site

    env = dict(os.environ)
    where = Path(__file__).resolve().parent.parent  # the folder holding this reportgen package
    installed = {Path(p).resolve() for p in [*site.getsitepackages(), site.getusersitepackages()]}
    if where not in installed:
        env["PYTHONPATH"] = os.pathsep.join([str(where), *filter(None, [env.get("PYTHONPATH")])])
    return env


class Every:
    """Build a report of every `n`-th step's checkpoint in a background `reportgen build` process.

    `hook(step, path)` builds `path` when `step` is a multiple of `n` (or passed one since the previous call);
    `hook.save(step, obj, run_dir)` first saves `obj` (a state dict, a dict such as
    {"model_state_dict", "config", "vocab_size"}, or a module, whose state_dict() is saved) as `run_dir/step_N.pt`.
    Both return at once; `wait()` / `close()` wait for the builds still running or queued."""

    def __init__(self, n: int, out: str | os.PathLike = "site", **build_options):
        from .config import BuildOptions

        if not isinstance(n, int) or n < 1:
            raise ValueError(f"Every(n): n must be a whole number of steps >= 1, not {n!r}")
        try:
            self._options = BuildOptions(ckpts=[], out=str(out), **build_options)
        except TypeError:
            import dataclasses

            known = sorted(f.name for f in dataclasses.fields(BuildOptions) if f.name not in ("ckpts", "out"))
            unknown = sorted(set(build_options) - set(known))
            raise TypeError(f"reportgen build has no option {', '.join(unknown)} (known: {', '.join(known)})") from None
        self.n = n
        self.out = Path(out)
        self.results: list[BuildResult] = []
        self._running = None  # (Popen, step, path, t0, stderr file, argv)
        self._queued = None  # (step, path)
        self._prev_step = None
        atexit.register(self.close)

    # -- when a step is due
    def due(self, step: int) -> bool:
        """Is `step` a multiple of n, or past one since the previous step seen (irregular save steps)?"""
        prev, self._prev_step = self._prev_step, step
        return step % self.n == 0 or (prev is not None and step // self.n > prev // self.n)

    def __call__(self, step: int, path: str | os.PathLike) -> bool:
        """After saving `path` at `step`: build it when the step is due. True when it was started or queued."""
        self.poll()
        if not self.due(step):
            return False
        self.submit(step, path)
        return True

    def save(self, step: int, obj, run_dir: str | os.PathLike):
        """When `step` is due: save `obj` as run_dir/step_N.pt (through a hidden temporary name, so a watcher
        never sees half a file) and build it. Returns the path, or None when the step is not due."""
        self.poll()
        if not self.due(step):
            return None
        import torch

        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        state = obj.state_dict() if callable(getattr(obj, "state_dict", None)) else obj
        path = run_dir / f"step_{step}.pt"
        tmp = run_dir / f".{path.name}.tmp-{os.getpid()}"
        torch.save(state, tmp)
        os.replace(tmp, path)
        self.submit(step, path)
        return path

    # -- the build processes
    def submit(self, step: int, path: str | os.PathLike) -> None:
        """Build `path` now, or after the running build (replacing a checkpoint queued before it)."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no checkpoint to build (save it before handing it to reportgen)")
        self.poll()
        if self._running is not None:
            if self._queued is not None:
                self._say(f"reportgen: not building {self._queued[1]}: a newer checkpoint ({path}) is queued")
            self._queued = (step, path)
            return
        self._start(step, path)

    def _start(self, step: int, path: Path) -> None:
        from .config import command_line

        argv = command_line(self._options, [str(path)])
        err = tempfile.TemporaryFile(mode="w+b", prefix="reportgen-build-")
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                env=_child_env())
        self._running = (proc, step, path, time.perf_counter(), err, argv)

    def poll(self) -> None:
        """Collect a build that has finished and start the queued one; returns at once."""
        if self._running is not None and self._running[0].poll() is not None:
            self._finish()
        if self._running is None and self._queued is not None:
            step, path = self._queued
            self._queued = None
            self._start(step, path)

    def _finish(self) -> None:
        proc, step, path, t0, err, argv = self._running
        self._running = None
        finished = time.perf_counter()
        err.seek(0)
        text = err.read().decode("utf-8", "replace")
        err.close()
        error = None
        if proc.returncode != 0:
            lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
            named = [ln for ln in lines if ln.startswith("reportgen: error:")]
            error = (named or lines or [f"exit status {proc.returncode}"])[-1].removeprefix("reportgen: error: ")
        self.results.append(BuildResult(step, path, proc.returncode, error, t0, finished, argv))
        if error is None:
            self._say(f"reportgen: report of {path} built in {finished - t0:.1f} s (site: {self.out / 'index.html'})")
        else:
            self._say(f"reportgen: report of {path} failed: {error}", always=True)

    def _say(self, msg: str, always: bool = False) -> None:
        if always or not self._options.quiet:
            print(msg, file=sys.stderr, flush=True)

    @property
    def busy(self) -> bool:
        """A build is running or queued (as of the last poll)."""
        return self._running is not None or self._queued is not None

    def wait(self) -> list[BuildResult]:
        """Wait for the running and queued builds; returns every result so far."""
        while self._running is not None or self._queued is not None:
            if self._running is not None:
                self._running[0].wait()
            self.poll()
        return self.results

    def close(self) -> list[BuildResult]:
        """wait(), and forget the exit hook."""
        results = self.wait()
        atexit.unregister(self.close)
        return results


def _timed(fn):
    """A callback hook that adds the time spent in it to `self.seconds`."""
    import functools

    @functools.wraps(fn)
    def wrapper(self, *args, **kw):
        t0 = time.perf_counter()
        try:
            return fn(self, *args, **kw)
        finally:
            self.seconds += time.perf_counter() - t0

    return wrapper


def _lightning():
    try:
        import lightning.pytorch as pl
    except ImportError:
        try:
            import pytorch_lightning as pl
        except ImportError:
            raise ImportError("reportgen.callbacks.Lightning needs Lightning: pip install 'reportgen[lightning]'") from None
    return pl


def Lightning(every: int = 1000, out: str | os.PathLike = "site", run_dir: str | os.PathLike | None = None,
              **build_options):
    """A Lightning Callback that, every `every` global steps, saves `run_dir/checkpoint-{step}.ckpt` with
    `trainer.save_checkpoint` (run_dir: `trainer.default_root_dir/checkpoints`) and builds its report in the
    background; when a ModelCheckpoint saved a file named after this step (`epoch=E-step=N.ckpt`), that file is
    built instead. Saving is done on every rank (sharded strategies need it), builds only on global rank 0. The
    builds still running are waited for at the end of training."""
    pl = _lightning()

    class ReportgenCallback(pl.Callback):
        def __init__(self):
            if not isinstance(every, int) or every < 1:
                raise ValueError(f"Lightning(every): a whole number of steps >= 1, not {every!r}")
            self.every = every
            self.run_dir = Path(run_dir) if run_dir is not None else None
            self.hook = Every(every, out, **build_options)
            self.seconds = 0.0  # time training spent inside this callback's hooks (saving included)
            self._pending = None  # a due step whose checkpoint is saved (or found) at the next hook
            self._last = None

        @_timed
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.is_global_zero:
                self.hook.poll()
            step = trainer.global_step
            if step > 0 and step % self.every == 0 and step != self._last:  # (accumulating batches share a step)
                self._last = self._pending = step
                # ModelCheckpoint callbacks run after this one in the same hook: see at the next hook what they saved

        @_timed
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self._flush(trainer)  # the weights are still those of the due step

        @_timed
        def on_validation_start(self, trainer, pl_module):
            self._flush(trainer)

        @_timed
        def on_train_epoch_end(self, trainer, pl_module):
            self._flush(trainer)

        def on_train_end(self, trainer, pl_module):
            t0 = time.perf_counter()
            self._flush(trainer)
            self.seconds += time.perf_counter() - t0  # (the wait below is after training, not counted)
            if trainer.is_global_zero:
                self.hook.wait()

        def teardown(self, trainer, pl_module, stage):
            if trainer.is_global_zero:
                self.hook.wait()

        def _flush(self, trainer) -> None:
            step, self._pending = self._pending, None
            if step is None:
                return
            path = self._saved_by_model_checkpoint(trainer, step)
            if path is None:
                folder = self.run_dir or Path(trainer.default_root_dir) / "checkpoints"
                path = folder / f"checkpoint-{step}.ckpt"
                trainer.save_checkpoint(path)  # on every rank: a collective for sharded strategies
            if trainer.is_global_zero:
                self.hook.submit(step, path)

        @staticmethod
        def _saved_by_model_checkpoint(trainer, step: int):
            """The file a ModelCheckpoint saved at this step, when its name tells the step (not last.ckpt)."""
            from .checkpoints import STEP_RE

            for cb in getattr(trainer, "checkpoint_callbacks", []):
                p = getattr(cb, "_last_checkpoint_saved", "") or ""
                m = STEP_RE.match(Path(p).name) if p else None
                if getattr(cb, "_last_global_step_saved", None) == step and m and int(m.group(1)) == step \
                        and Path(p).is_file():
                    return Path(p)
            return None

    return ReportgenCallback()


def HuggingFace(every: int | None = None, out: str | os.PathLike = "site", **build_options):
    """A transformers TrainerCallback that builds each checkpoint folder the Trainer saves
    (`args.output_dir/checkpoint-{global_step}`), in the background; `every`: only when the step is a multiple of
    it (default: every save). Only the main process builds; the end of training waits for the builds."""
    from transformers import TrainerCallback

    if every is not None and (not isinstance(every, int) or every < 1):
        raise ValueError(f"HuggingFace(every): a whole number of steps >= 1 or None, not {every!r}")

    class ReportgenTrainerCallback(TrainerCallback):
        def __init__(self):
            self.every = every
            self.hook = Every(every or 1, out, **build_options)

        def on_step_end(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                self.hook.poll()

        def on_save(self, args, state, control, **kwargs):
            step = state.global_step
            if not state.is_world_process_zero or (self.every and step % self.every):
                return
            path = Path(args.output_dir) / f"checkpoint-{step}"
            if not path.is_dir():
                print(f"reportgen: no checkpoint folder {path} after the save at step {step}; not building it",
                      file=sys.stderr, flush=True)
                return
            self.hook.submit(step, path)

        def on_train_end(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                self.hook.wait()

    return ReportgenTrainerCallback()
