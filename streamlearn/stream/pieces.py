"""Writes a large msgpack value as a run of pieces whose concatenation is exactly what msgspec would encode.

The intake's state at a snapshot barrier (pending logs, closed ids) reaches tens of
MB in a backlog. Encoded as one `bytes` it was held whole, next to the lists built
for it, while it was sent: a transient the size of the state, on top of the state.
Here each list is encoded a chunk at a time and the arrays are handed out as views,
so the sender holds one piece at a time. msgpack is context-free, so a header plus
the items encoded one chunk at a time equals the encoding of the whole list.

>>> import msgspec
>>> items = list(range(40))
>>> b"".join(array(items, msgspec.msgpack.encode, chunk=16)) == msgspec.msgpack.encode(items)
True
>>> b"".join(binary(memoryview(bytes(300)), chunk=128)) == msgspec.msgpack.encode(bytes(300))
True
"""

from __future__ import annotations

import struct
from typing import Callable, Iterator, Sequence, Union

Piece = Union[bytes, memoryview]
CHUNK_ITEMS = 4096          # list items encoded at a time
CHUNK_BYTES = 1 << 20       # bytes of an array's buffer handed out at a time


def array_header(n: int) -> bytes:
    """The msgpack header of an array of `n` items (fixarray, array 16 or array 32)."""
    return _container_header(n, 0x90, b"\xdc", b"\xdd")


def map_header(n: int) -> bytes:
    """The msgpack header of a map of `n` pairs (fixmap, map 16 or map 32)."""
    return _container_header(n, 0x80, b"\xde", b"\xdf")


def _container_header(n: int, fix: int, code16: bytes, code32: bytes) -> bytes:
    if n < 16:
        return bytes((fix | n,))
    if n < 1 << 16:
        return code16 + struct.pack(">H", n)
    return code32 + struct.pack(">I", n)


def binary_header(n: int) -> bytes:
    """The msgpack header of a bin value of `n` bytes (bin 8, 16 or 32)."""
    if n < 1 << 8:
        return b"\xc4" + struct.pack(">B", n)
    if n < 1 << 16:
        return b"\xc5" + struct.pack(">H", n)
    return b"\xc6" + struct.pack(">I", n)


def array(items: Sequence, encode: Callable[[object], bytes], chunk: int = CHUNK_ITEMS) -> Iterator[bytes]:
    """A list as msgpack: its header, then its items `chunk` at a time (each chunk's own header cut off)."""
    yield array_header(len(items))
    for start in range(0, len(items), chunk):
        part = items[start:start + chunk]
        yield encode(part)[len(array_header(len(part))):]


def packed_array(packed: Sequence[bytes], chunk: int = CHUNK_ITEMS) -> Iterator[bytes]:
    """A list of values already encoded as msgpack (e.g. `msgspec.Raw`): its header, then the values joined."""
    yield array_header(len(packed))
    for start in range(0, len(packed), chunk):
        yield b"".join(packed[start:start + chunk])


def binary(data: memoryview, chunk: int = CHUNK_BYTES) -> Iterator[Piece]:
    """A bin value: its header, then views of `data` (no copy) `chunk` bytes at a time."""
    data = data.cast("B")
    yield binary_header(len(data))
    for start in range(0, len(data), chunk):
        yield data[start:start + chunk]
