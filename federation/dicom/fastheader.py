"""A fast header reader for the common case: Part 10, explicit VR little endian.

It walks the elements up to the pixel data with `struct`, converting only the values a
scan needs, and exposes the small part of pydicom's `Dataset` interface that the scan
uses. Anything it does not handle (other transfer syntaxes, enhanced multi-frame
functional groups, SEG/RTSTRUCT, malformed streams) returns None and the caller falls
back to pydicom, so it changes speed, never results.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from functools import cache
from typing import Any

from pydicom.datadict import tag_for_keyword
from pydicom.uid import UID

__all__ = ["FastHeader", "read_fast_header"]

_EXPLICIT_LE = "1.2.840.10008.1.2.1"
_LONG_VRS = {
    b"OB",
    b"OW",
    b"OF",
    b"SQ",
    b"UT",
    b"UN",
    b"UC",
    b"UR",
    b"OD",
    b"OL",
    b"OV",
    b"SV",
    b"UV",
}
_PIXEL_DATA = 0x7FE00010
_FALLBACK_TAGS = {
    0x52009229,  # SharedFunctionalGroupsSequence
    0x52009230,  # PerFrameFunctionalGroupsSequence
    0x30060039,  # ROIContourSequence (RTSTRUCT)
    0x00620002,  # SegmentSequence (SEG)
}
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_CHUNK = 16384


@cache
def _keyword_tag(keyword: str) -> int:
    return tag_for_keyword(keyword) or -1


class _Raw:
    """Where the pixel data is (the subset of pydicom's RawDataElement the scan reads)."""

    def __init__(self, tell: int, length: int) -> None:
        self.value_tell = tell
        self.length = length
        self.value = None


class _Elements:
    """Elements by tag as raw (VR, value); sequences as lists of nested `_Elements`."""

    def __init__(
        self, values: dict[int, tuple[bytes, bytes]], items: dict[int, list[_Elements]]
    ) -> None:
        """Hold raw (VR, value) pairs by tag, and the items of each sequence."""
        self._values = values
        self._items = items

    def raw_elements(self) -> Iterator[tuple[int, str, bytes | None, list[Any]]]:
        """(tag, VR, raw value, sequence items) of every element (top level)."""
        for tag, (vr, raw) in self._values.items():
            yield tag, vr.decode("ascii", "replace"), raw, self._items.get(tag, [])

    @staticmethod
    def _tag(key: int | str) -> int:
        return key if isinstance(key, int) else _keyword_tag(key)

    def __contains__(self, key: int | str) -> bool:
        return self._tag(key) in self._values

    def get(self, key: int | str, default: Any = None) -> Any:
        """A converted value (str, int, float, list of numbers or of items), or `default`."""
        tag = self._tag(key)
        found = self._values.get(tag)
        if found is None:
            return default
        vr, raw = found
        if vr == b"SQ":
            return self._items.get(tag, [])
        if vr == b"US":
            shorts = struct.unpack(f"<{len(raw) // 2}H", raw)
            return shorts[0] if len(shorts) == 1 else list(shorts)
        text = raw.decode("latin-1").strip("\x00 ")
        if vr in (b"DS", b"IS"):
            if not text:
                return ""
            nums = [float(v) if vr == b"DS" else int(v) for v in text.split("\\")]
            return nums[0] if len(nums) == 1 else nums
        return text

    def __getattr__(self, keyword: str) -> Any:
        """Attribute access by keyword, like pydicom."""
        if keyword.startswith("_"):
            raise AttributeError(keyword)
        value = self.get(keyword)
        if value is None:
            raise AttributeError(keyword)
        return value


class FastHeader(_Elements):
    """Header values by tag, with the `Dataset` methods the scan uses."""

    def __init__(
        self,
        values: dict[int, tuple[bytes, bytes]],
        items: dict[int, list[_Elements]],
        tsyntax: str,
        pixel: _Raw,
    ) -> None:
        """Hold the elements, the transfer syntax and the pixel data's location."""
        super().__init__(values, items)
        self._pixel = pixel
        self.file_meta = {"TransferSyntaxUID": UID(tsyntax)}

    def __contains__(self, key: int | str) -> bool:
        tag = self._tag(key)
        return tag == _PIXEL_DATA or tag in self._values

    def keys(self) -> list[int]:
        """Tags present (top level)."""
        return [*self._values, _PIXEL_DATA]

    def get_item(self, key: int, *, keep_deferred: bool = True) -> _Raw:
        """The pixel data's location."""
        del keep_deferred
        if key != _PIXEL_DATA:
            raise KeyError(key)
        return self._pixel


def _element(buf: bytes, pos: int) -> tuple[int, bytes, int, int]:
    """(tag, VR, value length, value offset) of the explicit VR element at `pos`."""
    group, elem = struct.unpack_from("<HH", buf, pos)
    tag = group << 16 | elem
    if group == 0xFFFE:  # item / delimiters carry no VR
        return tag, b"", struct.unpack_from("<I", buf, pos + 4)[0], pos + 8
    vr = buf[pos + 4 : pos + 6]
    if vr in _LONG_VRS:
        return tag, vr, struct.unpack_from("<I", buf, pos + 8)[0], pos + 12
    return tag, vr, struct.unpack_from("<H", buf, pos + 6)[0], pos + 8


def _skip_undefined(buf: bytes, pos: int, end_tag: int) -> int:
    """Position after the delimiter `end_tag` of an undefined-length sequence or item."""
    while True:
        tag, _, length, start = _element(buf, pos)
        if tag == end_tag:
            return start
        if length == 0xFFFFFFFF:
            pos = _skip_undefined(buf, start, _ITEM_END if tag == _ITEM else _SEQ_END)
        else:
            pos = start + length


def _keep(
    buf: bytes,
    tag: int,
    vr: bytes,
    length: int,
    start: int,
    values: dict[int, tuple[bytes, bytes]],
    items: dict[int, list[_Elements]],
) -> int:
    """Store one element's value (a sequence's items); the position after it."""
    if vr == b"SQ":
        items[tag], pos = _sequence(buf, start, length)
        values[tag] = (vr, b"")
        return pos
    if length == 0xFFFFFFFF:
        values[tag] = (vr, b"")
        return _skip_undefined(buf, start, _SEQ_END)
    if start + length > len(buf):
        raise ValueError("element beyond the buffer")
    values[tag] = (vr, bytes(buf[start : start + length]))
    return start + length


def _item(buf: bytes, pos: int, end: int | None) -> tuple[_Elements, int]:
    """The elements of one item from `pos` to `end` (None: up to its delimiter)."""
    values: dict[int, tuple[bytes, bytes]] = {}
    items: dict[int, list[_Elements]] = {}
    while end is None or pos < end:
        tag, vr, length, start = _element(buf, pos)
        if tag == _ITEM_END:
            return _Elements(values, items), start
        pos = _keep(buf, tag, vr, length, start, values, items)
    return _Elements(values, items), pos


def _sequence(buf: bytes, pos: int, length: int) -> tuple[list[_Elements], int]:
    """The items of a sequence whose value starts at `pos`, and the position after it."""
    end = None if length == 0xFFFFFFFF else pos + length
    found: list[_Elements] = []
    while end is None or pos < end:
        tag, _, item_length, start = _element(buf, pos)
        if tag == _SEQ_END:
            return found, start
        if tag != _ITEM:
            raise ValueError("malformed sequence")
        item, pos = _item(buf, start, None if item_length == 0xFFFFFFFF else start + item_length)
        found.append(item)
    return found, pos


def read_fast_header(path: str, size: int) -> FastHeader | None:
    """Header of an explicit VR little endian Part 10 file, or None to use pydicom."""
    with open(path, "rb") as fh:
        buf = fh.read(_CHUNK)
        try:
            return _parse(buf, size)
        except (struct.error, IndexError, ValueError):
            pass
        if len(buf) < size:  # header longer than the first chunk
            buf += fh.read()
            try:
                return _parse(buf, size)
            except (struct.error, IndexError, ValueError):
                return None
    return None


def _parse(buf: bytes, size: int) -> FastHeader | None:
    if buf[128:132] != b"DICM":
        return None
    pos, tsyntax = 132, ""
    values: dict[int, tuple[bytes, bytes]] = {}
    items: dict[int, list[_Elements]] = {}
    while True:
        tag, vr, length, start = _element(buf, pos)
        if tag >> 16 != 0x0002:
            break
        if tag == 0x00020010:
            tsyntax = buf[start : start + length].decode("ascii").strip("\x00 ")
        pos = start + length
    if tsyntax != _EXPLICIT_LE:
        return None
    while pos < len(buf):
        tag, vr, length, start = _element(buf, pos)
        if tag in _FALLBACK_TAGS:
            return None
        if tag == _PIXEL_DATA:
            if length == 0xFFFFFFFF:
                return None
            return FastHeader(values, items, tsyntax, _Raw(start, length))
        if tag > _PIXEL_DATA:
            break
        pos = _keep(buf, tag, vr, length, start, values, items)
    if len(buf) >= size:  # whole file read and no pixel data: let pydicom say why
        return None
    raise ValueError("pixel data not reached")
