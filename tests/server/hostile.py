"""A corpus of hostile image files, built in memory: decompression bombs of each format, truncated
data, corrupt chunks, huge metadata, and a valid multi-picture JPEG (MPO). Used by
``test_hardening.py`` against the real server and by ``tests/unit/test_fuzz.py`` in-process.
"""

from __future__ import annotations

import io
import struct
import zlib

from PIL import Image


def _chunk(kind: bytes, data: bytes, crc: int | None = None) -> bytes:
    crc = zlib.crc32(kind + data) if crc is None else crc
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc & 0xFFFFFFFF)


def png_declaring(width: int, height: int, extra: bytes = b"") -> bytes:
    """A tiny PNG whose header declares ``width`` x ``height`` RGB (pixel data: a little zlib)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return (
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + extra + _chunk(b"IDAT", idat)
        + _chunk(b"IEND", b"")
    )  # fmt: skip


def encoded(image: Image.Image, fmt: str, **kw: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kw)
    return buffer.getvalue()


def jpeg_declaring(width: int, height: int) -> bytes:
    """A valid 16x16 JPEG with its SOF0 header patched to declare ``width`` x ``height``."""
    data = bytearray(encoded(Image.new("RGB", (16, 16), (200, 30, 30)), "JPEG"))
    sof = data.index(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, height, width)
    return bytes(data)


def gif_declaring(width: int, height: int) -> bytes:
    return b"GIF89a" + struct.pack("<HH", width, height) + b"\x00\x00\x00" + b";"


def small_png() -> bytes:
    return encoded(Image.new("RGB", (64, 48), (10, 120, 200)), "PNG")


def mpo() -> bytes:
    """Two pictures in one multi-picture JPEG, what phone cameras write."""
    first, second = Image.new("RGB", (64, 48), (200, 0, 0)), Image.new("RGB", (64, 48), (0, 0, 200))
    return encoded(first, "MPO", save_all=True, append_images=[second])


def refused(pixel_limit: int) -> dict[str, tuple[bytes, str]]:
    """Name -> (file, what the refusal says after the field name) for a server whose
    ``max_image_pixels`` is ``pixel_limit`` (declared sizes above it, below PIL's own limit)."""
    side = int(pixel_limit**0.5) + 100
    good = small_png()
    bad_crc = bytearray(good)
    bad_crc[29] ^= 0xFF  # inside IHDR's CRC
    ztxt = _chunk(b"zTXt", b"Comment\0\0" + zlib.compress(b"A" * (64 << 20)))
    iccp = _chunk(b"iCCP", b"icc\0\0" + zlib.compress(b"\0" * (64 << 20)))
    return {
        "png bomb past PIL's limit": (png_declaring(100_000, 100_000), "over the limit"),
        "png declaring over the pixel limit": (png_declaring(side, side), "over the limit"),
        "jpeg bomb past PIL's limit": (jpeg_declaring(65_000, 65_000), "over the limit"),
        "jpeg declaring over the pixel limit": (jpeg_declaring(side, side), "over the limit"),
        "png zero size": (png_declaring(0, 10), "cannot read"),
        "truncated png": (good[: len(good) // 2], "cannot"),
        "truncated jpeg": (jpeg_declaring(16, 16)[:200], "cannot"),
        "png with a corrupt chunk": (bytes(bad_crc), "cannot"),
        "png with 64 MB of zTXt": (png_declaring(32, 32, ztxt), "cannot"),
        "png with 64 MB of iCCP": (png_declaring(32, 32, iccp), "cannot"),
        "png whose pixel data is missing": (png_declaring(32, 32)[:-24], "cannot"),
        "gif bomb": (gif_declaring(65_535, 65_535), "looks like GIF"),
        "bmp": (encoded(Image.new("RGB", (8, 8)), "BMP"), "looks like BMP"),
        "tiff": (encoded(Image.new("RGB", (8, 8)), "TIFF"), "looks like TIFF"),
        "webp": (encoded(Image.new("RGB", (8, 8)), "WEBP"), "looks like WEBP"),
        "png magic only": (b"\x89PNG\r\n\x1a\n", "cannot"),
        "jpeg magic only": (b"\xff\xd8\xff", "cannot"),
    }
