"""Byte-reproducible HDF5 files: zero the object-header time stamps ITK's transform writer leaves in them.

HDF5 version-2 object headers (``OHDR``) with flag ``0x20`` store access / modification / change / birth
times (4 × uint32). Two writes of the same transform therefore differ, and so would a resumed build's
manifest. :func:`zero_object_header_times` sets the times to 0 and recomputes each header chunk's Jenkins
lookup3 checksum (HDF5's ``H5_checksum_lookup3``); a header whose stored checksum does not verify first is
left alone, so bytes that merely look like ``OHDR`` inside data are never touched.
"""
from __future__ import annotations

import struct

_M = 0xFFFFFFFF


def _rot(x: int, k: int) -> int:
    return ((x << k) | (x >> (32 - k))) & _M


def lookup3(data: bytes, initval: int = 0) -> int:
    """Bob Jenkins' lookup3 ``hashlittle`` (as in HDF5's ``H5_checksum_lookup3``)."""
    length = len(data)
    a = b = c = (0xDEADBEEF + length + initval) & _M
    i = 0
    while length > 12:
        k0, k1, k2 = struct.unpack_from("<III", data, i)
        a, b, c = (a + k0) & _M, (b + k1) & _M, (c + k2) & _M
        a = ((a - c) & _M) ^ _rot(c, 4); c = (c + b) & _M
        b = ((b - a) & _M) ^ _rot(a, 6); a = (a + c) & _M
        c = ((c - b) & _M) ^ _rot(b, 8); b = (b + a) & _M
        a = ((a - c) & _M) ^ _rot(c, 16); c = (c + b) & _M
        b = ((b - a) & _M) ^ _rot(a, 19); a = (a + c) & _M
        c = ((c - b) & _M) ^ _rot(b, 4); b = (b + a) & _M
        length -= 12
        i += 12
    if length == 0:
        return c
    k0, k1, k2 = struct.unpack("<III", data[i:i + length].ljust(12, b"\0"))
    a, b, c = (a + k0) & _M, (b + k1) & _M, (c + k2) & _M
    c = (c ^ b) - _rot(b, 14) & _M
    a = (a ^ c) - _rot(c, 11) & _M
    b = (b ^ a) - _rot(a, 25) & _M
    c = (c ^ b) - _rot(b, 16) & _M
    a = (a ^ c) - _rot(c, 4) & _M
    b = (b ^ a) - _rot(a, 14) & _M
    c = (c ^ b) - _rot(b, 24) & _M
    return c


def zero_object_header_times(raw: bytes) -> tuple[bytes, int]:
    """HDF5 file bytes with every verified v2 object header's time stamps zeroed; returns (bytes, count)."""
    buf = bytearray(raw)
    count = 0
    start = buf.find(b"OHDR")
    while start >= 0:
        version, flags = buf[start + 4], buf[start + 5]
        if version == 2 and flags & 0x20:
            pos = start + 6 + 16 + (4 if flags & 0x10 else 0)
            size_len = 1 << (flags & 0x03)
            chunk = int.from_bytes(buf[pos:pos + size_len], "little")
            end = pos + size_len + chunk
            if end + 4 <= len(buf) and struct.unpack_from("<I", buf, end)[0] == lookup3(bytes(buf[start:end])):
                buf[start + 6:start + 22] = bytes(16)
                struct.pack_into("<I", buf, end, lookup3(bytes(buf[start:end])))
                count += 1
        start = buf.find(b"OHDR", start + 4)
    return bytes(buf), count
