"""reportgen: publication-style HTML/PDF reports for small reasoning and language model checkpoints."""

from ._version import __version__  # noqa: E402

# The submodule reportgen.build is imported first, so that the function below keeps the name
# `reportgen.build` (a later first import of the submodule would rebind it to the module).
from . import build as _build_module  # noqa: E402  (light: its heavy imports are inside functions)

__all__ = ["__version__", "build"]


def build(ckpt, out="site", **options):
    """Build reports for one or more checkpoints, as `reportgen build` does. Returns the report folders.

    `ckpt` is a path or a list of paths (files, run folders or globs); `options` are the CLI's options by
    their Python names: data, split, samples, select, seed, device, dtype, only, formats, config, params,
    threads, quiet. Errors raise `reportgen.errors.ReportgenError`.
    """
    paths = [ckpt] if isinstance(ckpt, (str, bytes)) or hasattr(ckpt, "__fspath__") else list(ckpt)
    opts = _build_module.BuildOptions(ckpts=[str(p) for p in paths], out=str(out), **options)
    return _build_module.run_build(opts)
