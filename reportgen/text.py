"""Token display: whitespace made visible, the font fallback chain figures and pages draw with, and
code-point boxes for characters that no installed font of the chain has.

Every token renders: a character is drawn by the first family of `FALLBACK_FAMILIES` that has it
(matplotlib's per-glyph fallback, the Canvas' Pillow runs, the CSS font stacks); one that none of the
installed families has is drawn as a box with its code point (U+E000) instead of tofu, and
`uncovered_note` lists those tokens in the report. Coverage is read from the fonts' own cmaps with
FreeType (matplotlib's FT2Font), so it is exactly what matplotlib and Pillow can draw.

Nothing heavy is imported at module level: matplotlib only when a coverage question is first asked.
"""
from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from functools import lru_cache

# In order: a character is drawn by the first family that has it. DejaVu Sans first (matplotlib ships it,
# so Latin figures look the same everywhere); then the Noto families of the scripts vocabularies carry
# (fonts-noto-core and fonts-noto-cjk on Debian/Ubuntu; README "Set-up"). Families not installed are skipped.
FALLBACK_FAMILIES = (
    "DejaVu Sans",  # Latin, Greek, Cyrillic, Armenian, Georgian, many symbols
    "Noto Sans",
    "Noto Sans Cuneiform",  # Sumerian / Akkadian cuneiform, U+12000-U+1254F
    "Noto Sans CJK JP",  # Han, kana, Hangul
    "Noto Sans Old Persian", "Noto Sans Ugaritic", "Noto Sans Egyptian Hieroglyphs", "Noto Sans Linear B",
    "Noto Sans Arabic", "Noto Sans Hebrew", "Noto Sans Syriac", "Noto Sans Devanagari", "Noto Sans Bengali",
    "Noto Sans Tamil", "Noto Sans Thai", "Noto Sans Ethiopic", "Noto Sans Khmer",
    "Noto Sans Math", "Noto Sans Symbols", "Noto Sans Symbols2",
)
# What the Canvas' SVG files name (a reader's browser falls back by itself): the same on every machine,
# unlike the installed chain. templates/style.css names the same families.
SVG_FAMILIES = "'DejaVu Sans', 'Noto Sans', 'Noto Sans Cuneiform', 'Noto Sans CJK JP', sans-serif"
NO_GLYPH = {"Cf", "Co", "Cn", "Cs"}  # format (zero-width), private-use, unassigned, surrogate: boxed even where a font maps them
NOTE_LIMIT = 20  # tokens named in the report's note; the rest are counted


# whitespace and control characters drawn as Unicode control pictures, with their names for legends
CONTROL_PICTURES = {" ": ("␠", "space"), "\n": ("␊", "line feed (newline)"), "\t": ("␉", "tab"),
                    "\r": ("␍", "carriage return")}


def show_token(s: str) -> str:
    """A token string made visible: whitespace and control characters get control pictures, other invisible
    bytes \\xNN. Invisible format, private-use and unassigned characters above U+00FF stay as they are:
    the drawing shows them as code-point boxes."""
    out = []
    for ch in s:
        if ch in CONTROL_PICTURES:
            out.append(CONTROL_PICTURES[ch][0])
        elif not ch.isprintable() and (ord(ch) <= 0xFF or unicodedata.category(ch) not in NO_GLYPH):
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return "".join(out)


def symbol_key(tokens, empty: str | None = None) -> str:
    """A legend for the symbols show_token draws for these token strings, e.g. "␠ space, ␊ line feed (newline)";
    `empty`: the symbol drawn for an empty token, listed when one occurs. "" when none is used."""
    used = {ch for t in tokens for ch in t}
    parts = [f"{sym} {name}" for ch, (sym, name) in CONTROL_PICTURES.items() if ch in used]
    if any(not ch.isprintable() and ch not in CONTROL_PICTURES and ord(ch) <= 0xFF for ch in used):
        parts.append("\\xNN another control character")
    if empty and any(t == "" for t in tokens):
        parts.append(f"{empty} an empty token")
    return ", ".join(parts)


def codepoint(ch: str) -> str:
    return f"U+{ord(ch):04X}"


# ---------------------------------------------------------------- the installed chain


@dataclass(frozen=True)
class Face:
    """One installed family of the chain: its regular (and bold, else regular) font file and face index."""

    family: str
    path: str
    index: int
    bold_path: str
    bold_index: int


def _font_list():
    """matplotlib's font list, refreshed once when it misses families of the chain that are installed:
    matplotlib caches the system's fonts on first use, so fonts installed after that (the README's
    set-up on a machine that already ran matplotlib) would otherwise stay invisible to it."""
    from matplotlib import font_manager as fm

    names = {f.name for f in fm.fontManager.ttflist}
    if all(fam in names for fam in FALLBACK_FAMILIES):
        return fm.fontManager.ttflist
    known = {f.fname for f in fm.fontManager.ttflist}
    new = [p for p in fm.findSystemFonts() if p not in known]
    for p in new:
        try:
            fm.fontManager.addfont(p)
        except Exception:  # noqa: BLE001 - an unreadable font file is skipped, as matplotlib does
            pass
    if new:
        import matplotlib
        from pathlib import Path

        try:  # the cache matplotlib itself keeps: later processes start with the refreshed list
            fm.json_dump(fm.fontManager, Path(matplotlib.get_cachedir(), f"fontlist-v{fm.FontManager.__version__}.json"))
        except OSError:
            pass
    return fm.fontManager.ttflist


def _weight(e) -> int:
    w = e.weight
    return w if isinstance(w, int) else {"normal": 400, "regular": 400, "bold": 700}.get(str(w).lower(), 400)


def _face(family: str, entries: list) -> Face:
    regular = min(entries, key=lambda e: (abs(_weight(e) - 400), e.fname, e.index))
    bold = min(entries, key=lambda e: (abs(_weight(e) - 700), e.fname, e.index))
    bold = bold if _weight(bold) >= 600 else regular
    return Face(family, regular.fname, regular.index, bold.fname, bold.index)


@lru_cache(maxsize=1)
def _installed() -> dict:
    """family -> upright, normal-width font entries of every font matplotlib knows."""
    out: dict = {}
    for e in _font_list():
        if e.style == "normal" and e.stretch == "normal":
            out.setdefault(e.name, []).append(e)
    return out


@lru_cache(maxsize=1)
def _base_faces() -> tuple[Face, ...]:
    from pathlib import Path

    import matplotlib

    ttf = Path(matplotlib.get_data_path()) / "fonts" / "ttf"  # matplotlib's own DejaVu: the same glyphs everywhere
    out = [Face("DejaVu Sans", str(ttf / "DejaVuSans.ttf"), 0, str(ttf / "DejaVuSans-Bold.ttf"), 0)]
    fonts = _installed()
    out += [_face(fam, fonts[fam]) for fam in FALLBACK_FAMILIES[1:] if fam in fonts]
    return tuple(out)


_extra: list[Face] = []  # installed families found for characters the chain lacks (cover())


def faces() -> tuple[Face, ...]:
    """The installed families of the chain, in order: FALLBACK_FAMILIES, then those cover() added."""
    return _base_faces() + tuple(_extra)


def families() -> list[str]:
    """Family names of the chain, in order."""
    return [f.family for f in faces()]


@lru_cache(maxsize=None)
def _charmap(path: str, index: int) -> frozenset:
    from matplotlib.ft2font import FT2Font

    try:
        return frozenset(FT2Font(path, face_index=index).get_charmap())
    except (OSError, RuntimeError, ValueError):
        return frozenset()


@lru_cache(maxsize=65536)
def face_of(ch: str) -> int | None:
    """Index into faces() of the first family that has `ch`, or None when none has it."""
    cp = ord(ch)
    return next((i for i, f in enumerate(faces()) if cp in _charmap(f.path, f.index)), None)


def boxed(ch: str) -> bool:
    """True for a character drawn as a code-point box: invisible (format), private-use or unassigned,
    or one that no family of the chain has. Layout whitespace is never boxed."""
    if ch in " \n\r\t":
        return False
    if unicodedata.category(ch) in NO_GLYPH:
        return True
    return not ch.isspace() and ch.isprintable() and face_of(ch) is None


def missing(s: str) -> list[str]:
    """The characters of a display string drawn as code-point boxes (each once, in order)."""
    out = []
    for ch in s:
        if ch not in out and boxed(ch):
            out.append(ch)
    return out


def cover(chars) -> None:
    """Add to the chain the installed families (Noto first, then by name) that have characters of `chars`
    no family of the chain has, e.g. a vocabulary's: its figures then draw every script some font has."""
    need = {ord(c) for c in set(chars) if not c.isspace() and c.isprintable()
            and unicodedata.category(c) not in NO_GLYPH and face_of(c) is None}
    if not need:
        return
    have = set(families())
    fonts = _installed()
    for fam in sorted(fonts, key=lambda f: (not f.startswith("Noto Sans"), f)):
        if fam in have:
            continue
        face = _face(fam, fonts[fam])
        if need & _charmap(face.path, face.index):
            _extra.append(face)
            need -= _charmap(face.path, face.index)
            if not need:
                break
    face_of.cache_clear()


def families_for(s: str) -> list[str]:
    """The families a string needs, in chain order, DejaVu Sans first: what a matplotlib text is given
    (naming only these keeps plain text as fast and its files as they were)."""
    need = {face_of(ch) for ch in s if not boxed(ch)} - {None, 0}
    return ["DejaVu Sans"] + [faces()[k].family for k in sorted(need)]


def runs(s: str) -> list[tuple[int | None, str]]:
    """`s` split into runs drawn with one face each: (index into faces(), text); a boxed character is
    its own run with face None."""
    out: list[list] = []
    for ch in s:
        k = None if boxed(ch) else (face_of(ch) or 0)
        if k is not None and out and out[-1][0] == k:
            out[-1][1] += ch
        else:
            out.append([k, ch])
    return [(k, t) for k, t in out]


def boxed_text(s: str) -> str:
    """`s` with each boxed character written as its code point (for plain-text labels)."""
    gone = set(missing(s))
    return "".join(codepoint(ch) if ch in gone else ch for ch in s)


def html(s: str):
    """A display string as HTML (Markup): escaped, each boxed character as a box with its code point."""
    from markupsafe import Markup, escape

    gone = set(missing(s))
    if not gone:
        return escape(s)
    box = Markup('<span class="cp" title="no installed font draws this character" style="border:1px solid;'
                 'padding:0 .12em;font-size:.72em;font-family:\'DejaVu Sans Mono\',monospace">{}</span>')
    return Markup("").join(box.format(codepoint(ch)) if ch in gone else escape(ch) for ch in s)


def uncovered_note(vocab: list[str]) -> str | None:
    """One sentence naming the tokens drawn with code-point boxes, or None when every token renders.
    Extends the chain (cover()) with installed fonts for the vocabulary's scripts first."""
    shown = [show_token(t) for t in vocab]
    cover("".join(shown))
    bad = [(i, missing(t)) for i, t in enumerate(shown)]
    bad = [(i, m) for i, m in bad if m]
    if not bad:
        return None
    named = ", ".join(f"{i} ({' '.join(codepoint(c) for c in m)})" for i, m in bad[:NOTE_LIMIT])
    more = f" and {len(bad) - NOTE_LIMIT} more" if len(bad) > NOTE_LIMIT else ""
    n = len(bad)
    return (f"{n} token{'s' if n != 1 else ''} of the vocabulary {'have' if n != 1 else 'has'} characters no installed "
            f"font draws (invisible, private-use or unassigned, or of a script without an installed font), shown as "
            f"code-point boxes: id {named}{more}.")
