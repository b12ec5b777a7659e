"""Analysis parameters from `reportgen.toml` (a table per analysis) and `--param name.key=value`
flags (flags win). Unknown analyses or keys are errors, never silently dropped."""
from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

from .errors import ReportgenError


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
