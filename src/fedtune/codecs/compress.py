"""Lossless compressors over the whole serialised message: DEFLATE (zlib container), gzip, zstd.

Each decompressor is told the exact size the sender declared (which the receiver has already
capped) and never produces more than that: a zip bomb costs the receiver at most the cap.
The standard library does DEFLATE and gzip; zstd comes from the ``zstandard`` package
(optional extra ``fedtune[codecs]``).
"""

from __future__ import annotations

import zlib

from fedtune.codecs.base import Compressor, missing_dependency, register_compressor
from fedtune.errors import MessageError


class _Zlib(Compressor):
    wbits: int  # 15: zlib container (RFC 1950, Adler-32); 31: gzip container (RFC 1952, CRC-32)
    default_level = 6

    def compress(self, data: bytes) -> bytes:
        level = self.default_level if self.level is None else self.level
        c = zlib.compressobj(level, zlib.DEFLATED, self.wbits)  # gzip header mtime 0: deterministic
        return c.compress(data) + c.flush()

    @classmethod
    def decompress(cls, data: bytes, size: int) -> bytes:
        d = zlib.decompressobj(cls.wbits)
        try:
            out = d.decompress(data, size + 1)
        except zlib.error as e:
            raise MessageError(f"{cls.name}: corrupt stream ({e})") from None
        if len(out) != size or not d.eof or d.unused_data or d.unconsumed_tail:
            raise MessageError(f"{cls.name}: stream does not hold exactly the declared {size} bytes")
        return out


@register_compressor
class Deflate(_Zlib):
    name = "deflate"
    wbits = 15


@register_compressor
class Gzip(_Zlib):
    name = "gzip"
    wbits = 31


def _zstd():
    try:
        import zstandard
    except ImportError:
        raise missing_dependency("zstd", "zstandard") from None
    return zstandard


@register_compressor
class Zstd(Compressor):
    name = "zstd"

    def compress(self, data: bytes) -> bytes:
        z = _zstd()
        return z.ZstdCompressor(level=3 if self.level is None else self.level, write_content_size=True).compress(data)

    @classmethod
    def decompress(cls, data: bytes, size: int) -> bytes:
        try:
            z = _zstd()
        except Exception as e:
            raise MessageError(f"cannot decode a zstd message here: {e}") from None
        try:
            # zstd trusts the frame's own content size over max_output_size: check it first.
            declared = z.frame_content_size(data)
            if declared not in (-1, size):
                raise MessageError(f"zstd frame declares {declared} bytes, the message {size}")
            out = z.ZstdDecompressor().decompress(data, max_output_size=size, allow_extra_data=False)
        except z.ZstdError as e:
            raise MessageError(f"zstd: corrupt stream ({e})") from None
        if len(out) != size:
            raise MessageError(f"zstd: stream holds {len(out)} bytes, not the declared {size}")
        return out
