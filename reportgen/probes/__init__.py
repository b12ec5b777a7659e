"""The expensive model passes, run once per subject: `trm` (ACT steps over puzzles) and `lm` (generic needs over
token batches). Every analysis reads their trace; none runs a model itself."""
from __future__ import annotations


def resolve_device(device: str) -> str:
    import torch

    from ..errors import ReportgenError

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ReportgenError("--device cuda: no CUDA device is available (use --device cpu or auto)")
    if device not in ("cpu", "cuda"):
        raise ReportgenError(f"--device must be auto, cpu or cuda, not {device!r}")
    return device
