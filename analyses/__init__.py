"""Analysis plugins, registered by name.

An analysis is one module with NAME, TITLE, SUBJECTS (the subject kinds it applies to), a `Params`
dataclass, `compute(trace, params) -> dict` (JSON-serialisable data, never draws) and
`figures(data, params) -> list[reportgen.figures.Figure]` (draws that data, never computes
statistics), `needs(params) -> dict` (what the probe must compute for it), optionally `metrics(data) -> dict`
(headline numbers for index pages) and `METRICS` (their labels for the site's tables and trends), plus the
template partial `templates/partials/<NAME>.html`. Add one by adding its module to `_MODULES` below, or from
another package through the `reportgen.analyses` entry point group.
"""
from __future__ import annotations

from . import (attention, gradient_flow, halting, predictions, recursion, sae_features, solving_stats, step_evolution,
               sudoku_latents, token_map)

_MODULES = [sudoku_latents, step_evolution, solving_stats, halting, recursion, predictions, attention, gradient_flow, token_map, sae_features]
REQUIRED = ("NAME", "TITLE", "SUBJECTS", "Params", "compute", "figures")


def _plugins() -> list:
    """Analyses of other installed packages: the `reportgen.analyses` entry point group (each a module like
    these, with its partial in a templates/partials/ folder beside it)."""
    from importlib.metadata import entry_points

    from reportgen.errors import ReportgenError

    out = []
    for ep in entry_points(group="reportgen.analyses"):
        try:
            mod = ep.load()
        except Exception as e:  # noqa: BLE001 - a broken plugin is named, not a traceback
            raise ReportgenError(f"analysis plugin {ep.name} ({ep.value}) cannot be imported: {e}") from None
        missing = [a for a in REQUIRED if not hasattr(mod, a)]
        if missing:
            raise ReportgenError(f"analysis plugin {ep.name}: module {mod.__name__} lacks {', '.join(missing)}")
        out.append(mod)
    return out


_MODULES += [m for m in _plugins() if m.NAME not in {b.NAME for b in _MODULES}]
REGISTRY = {m.NAME: m for m in _MODULES}


def for_subject(kind: str) -> list:
    """The analyses that apply to a subject kind, in report order."""
    return [m for m in _MODULES if kind in m.SUBJECTS]
