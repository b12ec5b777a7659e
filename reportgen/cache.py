"""A report's digest: the checkpoint's bytes, its kind's input files and options, the parameters of the
analyses it runs, and the reportgen version. A report whose digest is unchanged is not rebuilt."""
from __future__ import annotations

import json
from pathlib import Path

from ._version import __version__

# options that change every kind's report; each kind adds its own Options (an option of another kind, e.g.
# --mask-rate for a TRM report, never makes a report stale)
COMMON_OPTION_FIELDS = ("eval", "device", "dpi", "formats", "figure_formats", "self_contained", "templates")


def selected_analyses(kind, opts) -> list:
    """The analysis modules a report of this kind runs (those registered for its subject, as --only selects)."""
    import analyses

    return [m for m in analyses.for_subject(kind.SUBJECT) if not opts.only or m.NAME in opts.only]


def cache_key(sha: str, kind, opts, params: dict, files: list[Path]) -> str:
    import dataclasses
    import hashlib

    from .kinds import options

    h = hashlib.sha256()
    h.update(sha.encode())
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    if opts.templates:  # overriding templates change the pages
        for f in sorted(Path(opts.templates).rglob("*")):
            if f.is_file():
                h.update(str(f.relative_to(opts.templates)).encode())
                h.update(f.read_bytes())
    fields = {k: getattr(opts, k) for k in COMMON_OPTION_FIELDS}
    fields["options"] = dataclasses.asdict(options(kind, opts))
    runs = {m.NAME for m in selected_analyses(kind, opts)}
    fields["analyses"] = sorted(runs)  # what --only selects of this kind, not how it was spelled
    fields["params"] = {name: dataclasses.asdict(p) for name, p in sorted(params.items()) if name in runs}
    fields["kind"] = kind.NAME
    fields["version"] = __version__
    h.update(json.dumps(fields, sort_keys=True, default=str).encode())
    return h.hexdigest()


def up_to_date(final: Path, key: str) -> bool:
    """True when the report in `final` was built from the same inputs and all its files are there."""
    from .site import REPORT_META

    try:
        meta = json.loads((final / REPORT_META).read_text())
    except (OSError, ValueError):
        return False
    return meta.get("cache_key") == key and all((final / f).is_file() for f in meta.get("files", []))
