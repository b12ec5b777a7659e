"""reportgen: publication-style HTML/PDF reports for small reasoning and language model checkpoints."""

__version__ = "0.1.0"

__all__ = ["__version__", "build"]


def build(ckpt, out="site", **options):
    """Build reports for one or more checkpoints, as `reportgen build` does. Returns the report folders.

    `ckpt` is a path or a list of paths; `options` are the CLI's options by their Python names
    (data, split, samples, select, seed, device, dtype, only, formats).
    """
    from .build import BuildOptions, run_build

    paths = [ckpt] if isinstance(ckpt, (str, bytes)) or hasattr(ckpt, "__fspath__") else list(ckpt)
    return run_build(BuildOptions(ckpts=[str(p) for p in paths], out=str(out), **options))
