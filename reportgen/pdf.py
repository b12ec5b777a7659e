"""Reproducible fonts in WeasyPrint's PDFs.

WeasyPrint subsets every embedded font, with HarfBuzz' subset library when the system has it and with
fontTools otherwise; fontTools writes the current time into the subset's `head.modified`, so two builds
of the same page would embed different font bytes. `fixed_font_times()` makes WeasyPrint's font clean-up
(`Font.clean`: subsetting, and the fontTools re-saves of variable and bitmap fonts) end by setting that
field to SOURCE_DATE_EPOCH, or to 1970-01-01 when it is unset, whichever path was taken.
"""
from __future__ import annotations

import os
import struct

MAC_EPOCH = 2082844800  # seconds from 1904-01-01 (OpenType LONGDATETIME) to 1970-01-01
SFNT = (b"\x00\x01\x00\x00", b"OTTO", b"true")  # one TrueType / CFF font (not a collection)


def font_time() -> int:
    """The modification time embedded fonts get: SOURCE_DATE_EPOCH, else 0 (Unix seconds)."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    return int(epoch) if epoch.isdigit() else 0


def _checksum(data: bytes) -> int:
    data += b"\0" * (-len(data) % 4)
    return sum(struct.unpack(f">{len(data) // 4}I", data)) & 0xFFFFFFFF


def set_modified(font: bytes, unix_time: int) -> bytes:
    """`font` (an OpenType file) with head.modified set to `unix_time` and its checksums updated; other
    data (a font collection, something unreadable) is returned unchanged."""
    if font[:4] not in SFNT or len(font) < 12:
        return font
    (n,) = struct.unpack(">H", font[4:6])
    for i in range(n):
        rec = 12 + 16 * i
        tag, _, offset, length = struct.unpack(">4sIII", font[rec:rec + 16])
        if tag != b"head":
            continue
        if length < 36 or offset + length > len(font):
            return font
        out = bytearray(font)
        out[offset + 28:offset + 36] = struct.pack(">Q", unix_time + MAC_EPOCH)
        out[offset + 8:offset + 12] = b"\0\0\0\0"  # checkSumAdjustment counts as 0 in every sum
        out[rec + 4:rec + 8] = struct.pack(">I", _checksum(bytes(out[offset:offset + length])))
        out[offset + 8:offset + 12] = struct.pack(">I", (0xB1B0AFBA - _checksum(bytes(out))) & 0xFFFFFFFF)
        return bytes(out)
    return font


def fixed_font_times() -> None:
    """Patch WeasyPrint (once per process) so every embedded font carries font_time() as head.modified."""
    from weasyprint.pdf import fonts

    clean = getattr(fonts.Font, "clean", None)
    if clean is None or getattr(clean, "_reportgen_fixed_time", False):
        return

    def clean_with_fixed_time(self, *args, **kwargs):
        clean(self, *args, **kwargs)
        self.file_content = set_modified(self.file_content, font_time())

    clean_with_fixed_time._reportgen_fixed_time = True
    fonts.Font.clean = clean_with_fixed_time
