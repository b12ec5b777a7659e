"""Analysis plugins, registered by name.

An analysis is one module with NAME, TITLE, SUBJECTS (the subject kinds it applies to), a `Params`
dataclass, `compute(trace, params) -> dict` (JSON-serialisable data, never draws) and
`figures(data, params) -> list[reportgen.figures.Figure]` (draws that data, never computes
statistics), optionally `metrics(data) -> dict` (headline numbers for index pages), plus the template
partial `templates/partials/<NAME>.html`. Add one by adding its module to `_MODULES` below.
"""
from __future__ import annotations

from . import (attention, gradient_flow, predictions, sae_features, solving_stats, step_evolution, sudoku_latents,
               token_map)

_MODULES = (sudoku_latents, step_evolution, solving_stats, predictions, attention, gradient_flow, token_map, sae_features)
REGISTRY = {m.NAME: m for m in _MODULES}


def for_subject(kind: str) -> list:
    """The analyses that apply to a subject kind, in report order."""
    return [m for m in _MODULES if kind in m.SUBJECTS]
