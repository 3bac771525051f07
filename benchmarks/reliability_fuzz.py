"""Fuzz the image decoder (``load_image``, ``image_size``, ``is_grey_file``) with random and mutated files.

Seeds are small valid PNG (8-bit RGB, 16-bit grey, 48-bit RGB), JPEG (plain, EXIF-rotated), BMP, TIFF
(RGB, CMYK) and GIF files. Each iteration writes one file (under a random accepted extension) that is
either random bytes or a seed with bytes overwritten, a block inserted, or the tail cut off; all three
readers are called on it. Anything other than a valid uint8 (H, W, 1|3) array or an ImageError that
names the file counts as a crash. Deterministic for a given ``--seed``.

    nice -n 19 .venv/bin/python benchmarks/reliability_fuzz.py --iterations 20000
"""

from __future__ import annotations

import argparse
import io
import random
import struct
import sys
import tempfile
import time
import traceback
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _png48(h: int = 12, w: int = 16) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    a = (np.arange(h * w * 3, dtype=np.uint32).reshape(h, w, 3) * 300 % 65536).astype(">u2")
    rows = b"".join(b"\x00" + a[i].tobytes() for i in range(h))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def seeds() -> list[bytes]:
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (12, 16, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6
    return [_encode(rgb, "PNG"), _encode(rgb, "JPEG"), _encode(rgb, "JPEG", exif=exif), _encode(rgb, "BMP"),
            _encode(rgb, "TIFF"), _encode(rgb.convert("CMYK"), "TIFF"), _encode(rgb.convert("P"), "GIF"),
            _encode(Image.fromarray(np.full((12, 16), 40000, np.uint16)), "PNG"), _png48()]


def mutate(r: random.Random, pool: list[bytes]) -> bytes:
    kind = r.random()
    if kind < 0.15:
        return r.randbytes(r.randint(0, 400))
    data = bytearray(r.choice(pool))
    if kind < 0.55:
        for _ in range(r.randint(1, 8)):
            data[r.randrange(len(data))] = r.randrange(256)
    elif kind < 0.75:
        at = r.randrange(len(data))
        data[at:at] = r.randbytes(r.randint(1, 64))
    else:
        data = data[: r.randrange(len(data) + 1)]
    return bytes(data)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iterations", type=int, default=20000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep-slowest", help="write the input of the slowest call to this file")
    args = ap.parse_args()

    from anomap.data.images import IMAGE_EXTENSIONS, image_size, is_grey_file, load_image
    from anomap.errors import ImageError

    r = random.Random(args.seed)
    pool = seeds()
    counts = {"decoded": 0, "clean error": 0, "crash": 0}
    crashes: list[str] = []
    slowest, slowest_at, slowest_data = 0.0, "", b""
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="anomap-fuzz-") as tmp:
        for i in range(args.iterations):
            path = Path(tmp) / f"f{i % 8}{r.choice(IMAGE_EXTENSIONS)}"
            data = mutate(r, pool)
            path.write_bytes(data)
            for fn in (load_image, image_size, is_grey_file):
                t = time.perf_counter()
                try:
                    out = fn(path)
                    if fn is load_image:
                        assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] in (1, 3)
                        counts["decoded"] += 1
                except ImageError as exc:
                    assert str(path) in str(exc) and "\n" not in str(exc)
                    counts["clean error"] += fn is load_image
                except Exception:  # noqa: BLE001 - this is what the fuzzer looks for
                    counts["crash"] += 1
                    crashes.append(f"iteration {i} {fn.__name__}: {traceback.format_exc(limit=3)}")
                if time.perf_counter() - t > slowest:
                    slowest = time.perf_counter() - t
                    slowest_at, slowest_data = f"iteration {i}, {fn.__name__}, {path.suffix}, {len(data)} bytes", data
            path.unlink()
    seconds = time.perf_counter() - t0
    print("| iterations | calls | decoded | clean ImageError | crashes | slowest call | seconds |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {args.iterations} | {3 * args.iterations} | {counts['decoded']} | {counts['clean error']} | "
          f"{counts['crash']} | {slowest * 1000:.0f} ms | {seconds:.0f} |")
    print(f"\nslowest call: {slowest_at}")
    if args.keep_slowest:
        Path(args.keep_slowest).write_bytes(slowest_data)
    for c in crashes[:10]:
        print(c, file=sys.stderr)
    sys.exit(1 if crashes else 0)


if __name__ == "__main__":
    main()
