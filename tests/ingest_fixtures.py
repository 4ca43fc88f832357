"""Builders for ingest tests: folders full of what real photo folders contain, and a hostile
HTTP server on 127.0.0.1 (good images, 404, 503, slow bodies, resets, redirect loops, endless bodies).
"""

from __future__ import annotations

import io
import os
import socket
import struct
import threading
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
from PIL import Image

import lance_io.image_size  # noqa: F401  (registers HEIC/HEIF: image_bytes(..., "HEIF") saves through it)


def noise_image(seed: int, size: tuple[int, int] = (64, 48), mode: str = "RGB") -> Image.Image:
    """Return a distinct random image (distinct seed, distinct content)."""
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "CMYK": 4, "L": 1}[mode]
    array = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    return Image.fromarray(array.squeeze() if channels == 1 else array, mode=mode)


def image_bytes(seed: int, fmt: str = "JPEG", mode: str = "RGB", size: tuple[int, int] = (64, 48)) -> bytes:
    """Return the encoded bytes of a distinct random image."""
    buffer = io.BytesIO()
    noise_image(seed, size, mode).save(buffer, fmt)
    return buffer.getvalue()


def png_declaring(width: int, height: int) -> bytes:
    """Return a tiny PNG whose header declares `width` x `height` (a decompression bomb's shape)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def sixteen_bit_png(seed: int) -> bytes:
    """Return a 16-bit grayscale PNG."""
    array = np.random.default_rng(seed).integers(0, 65535, (32, 32), dtype=np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    return buffer.getvalue()


def animated_gif(seed: int) -> bytes:
    """Return a 3-frame animated GIF."""
    frames = [noise_image(seed + i, (32, 32)).convert("P") for i in range(3)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buffer.getvalue()


def rotated_jpeg(seed: int) -> bytes:
    """Return a JPEG with EXIF orientation 6."""
    image = noise_image(seed, (40, 30))
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", exif=exif.tobytes())
    return buffer.getvalue()


@dataclass
class HostileFolder:
    """A folder built to break decoders, and what ingest must make of it."""

    root: Path
    added: int
    duplicates: int
    skipped: int
    errors: Counter[str] = field(default_factory=Counter)

    @property
    def inputs(self) -> int:
        """Every input the folder holds."""
        return self.added + self.duplicates + self.skipped + sum(self.errors.values())


def build_hostile_folder(base: Path) -> HostileFolder:
    """Write a photo folder with good images in exotic modes and every kind of junk; return its expected outcome."""
    root = base / "photos"
    deep = root / "nested" / "deep" / "a" / "b" / "c"
    deep.mkdir(parents=True)
    outside = base / "outside.jpg"
    outside.write_bytes(image_bytes(900))
    good = image_bytes(1)
    files = {
        # added (12, and 1 below)
        "good.jpg": good,
        "nested/deep/a/b/c/photo.png": image_bytes(2, "PNG"),
        "cmyk.jpg": image_bytes(3, "JPEG", "CMYK"),
        "sixteen.png": sixteen_bit_png(4),
        "palette.png": palette_png(5),
        "rgba.png": image_bytes(6, "PNG", "RGBA"),
        "animated.gif": animated_gif(7),
        "rotated.jpg": rotated_jpeg(8),
        "really a png.txt": image_bytes(9, "PNG"),
        "NOEXTENSION": image_bytes(10),
        "été photo ü 写真.jpg": image_bytes(11),
        "phone.heic": image_bytes(14, "HEIF"),  # a phone camera's default format
        # duplicates (1 here + 1 symlink below)
        "copy of good.jpg": good,
        # errors
        "truncated.jpg": image_bytes(12, size=(200, 150))[:1500],
        "empty.jpg": b"",
        "page.jpg": b"<!DOCTYPE html><html><body>Not found</body></html>",
        "bomb.png": png_declaring(100_000, 100_000),
        "random.png": os.urandom(2048),
        # skipped
        "notes.txt": b"shopping list\n",
        ".DS_Store": b"\x00\x00\x00\x01Bud1" + bytes(64),
        "EMPTY": b"",
        "._good.jpg": apple_double(),  # macOS metadata beside a copied file, and in a Mac-made zip
        "__MACOSX/._good.jpg": apple_double(),
    }
    for name, data in files.items():
        (root / name).parent.mkdir(exist_ok=True)
        (root / name).write_bytes(data)
    os.symlink("good.jpg", root / "link to good.jpg")  # duplicate
    os.symlink(".", root / "nested" / "loop")  # a folder loop: walked once, no input
    os.symlink("selfloop.jpg", root / "selfloop.jpg")  # symlink_loop
    os.symlink("gone.jpg", root / "broken.jpg")  # broken_symlink
    os.symlink(outside, root / "escape.jpg")  # outside_root
    os.mkfifo(root / "pipe.jpg")  # not_a_file: refused unopened (a read would wait for a writer)
    # a folder and a file whose names are not UTF-8 (Latin-1 bytes, as old archives hold): added,
    # its source and class shown with \\xNN escapes
    latin1 = Path(os.fsdecode(os.fsencode(root) + b"/caf\xe9"))
    latin1.mkdir()
    (latin1 / os.fsdecode(b"cr\xe8me \xff.jpg")).write_bytes(image_bytes(13))
    errors = Counter(
        truncated=1,
        empty_file=1,
        not_an_image=2,
        decompression_bomb=1,
        symlink_loop=1,
        broken_symlink=1,
        outside_root=1,
        not_a_file=1,
    )
    return HostileFolder(root=root, added=13, duplicates=2, skipped=5, errors=errors)


def apple_double() -> bytes:
    """Return a macOS AppleDouble file (``._photo.jpg``): its magic and version, then its filler."""
    return b"\x00\x05\x16\x07\x00\x02\x00\x00" + b"Mac OS X        " + b"\x00\x02" + bytes(4000)


def palette_png(seed: int) -> bytes:
    """Return a palette (P mode) PNG."""
    buffer = io.BytesIO()
    noise_image(seed, (32, 32)).convert("P", palette=Image.Palette.ADAPTIVE).save(buffer, "PNG")
    return buffer.getvalue()


def build_class_folder(base: Path, classes: dict[str, int], seed: int = 100) -> Path:
    """Write an ImageFolder tree (one subfolder per class, `n` distinct JPEGs each); return its root."""
    root = base / "classes"
    for class_index, (name, count) in enumerate(classes.items()):
        (root / name).mkdir(parents=True)
        for i in range(count):
            (root / name / f"{i}.jpg").write_bytes(image_bytes(seed + 100 * class_index + i))
    return root


class HostileServer:
    """A threaded HTTP server on 127.0.0.1 serving good images and every way of failing.

    Routes: ``/img/<n>.jpg`` (distinct image n), ``/missing.jpg`` (404), ``/flaky/<n>.jpg`` (503 once
    then the image), ``/down.jpg`` (503 always), ``/slow.jpg`` (a byte every 0.2 s, bounded to 20 s),
    ``/reset.jpg`` (connection reset), ``/loop`` (redirects to itself), ``/redirect/<n>.jpg``
    (one redirect to image n), ``/endless.jpg`` (JPEG magic then an unbounded body, cut after
    256 MiB), ``/html.jpg`` (an HTML page), ``/hold/<n>.jpg`` (0.2 s wait, counts concurrent requests), ``/to/<url>`` (redirect to any URL),
    ``/garbled.jpg`` (a body that is not the gzip its ``Content-Encoding`` says).
    """

    def __init__(self) -> None:
        self.hits: Counter[str] = Counter()
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                server.hits[self.path] += 1
                server.route(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        """Return the full URL of a route."""
        return f"http://127.0.0.1:{self.port}{path}"

    def __enter__(self) -> HostileServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def route(self, h: BaseHTTPRequestHandler) -> None:
        """Answer one request according to its path."""
        path = h.path
        if path.startswith("/img/"):
            self._send(h, 200, image_bytes(int(path.split("/")[-1].split(".")[0]) + 5000), "image/jpeg")
        elif path.startswith("/flaky/"):
            if self.hits[path] == 1:
                self._send(h, 503, b"busy", "text/plain")
            else:
                self._send(h, 200, image_bytes(int(path.split("/")[-1].split(".")[0]) + 5000), "image/jpeg")
        elif path.startswith("/hold/"):
            self._hold(h, int(path.split("/")[-1].split(".")[0]))
        elif path == "/down.jpg":
            self._send(h, 503, b"down", "text/plain")
        elif path == "/html.jpg":
            self._send(h, 200, b"<html><body>login</body></html>" * 4, "text/html")
        elif path == "/garbled.jpg":
            h.send_response(200)
            h.send_header("Content-Encoding", "gzip")
            h.send_header("Content-Length", "64")
            h.end_headers()
            h.wfile.write(b"\xff\xd8\xff" + bytes(61))
        elif path == "/loop":
            self._redirect(h, "/loop")
        elif path.startswith("/redirect/"):
            self._redirect(h, "/img/" + path.split("/")[-1])
        elif path.startswith("/to/"):
            self._redirect(h, path.removeprefix("/to/"))
        elif path == "/reset.jpg":
            h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            h.connection.close()
            h.close_connection = True
        elif path == "/slow.jpg":
            self._drip(h)
        elif path == "/endless.jpg":
            self._endless(h)
        else:
            self._send(h, 404, b"not found", "text/plain")

    def _hold(self, h: BaseHTTPRequestHandler, n: int) -> None:
        with self._lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        time.sleep(0.2)
        with self._lock:
            self.in_flight -= 1
        self._send(h, 200, image_bytes(n + 7000), "image/jpeg")

    @staticmethod
    def _send(h: BaseHTTPRequestHandler, status: int, body: bytes, content_type: str) -> None:
        h.send_response(status)
        h.send_header("Content-Type", content_type)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    @staticmethod
    def _redirect(h: BaseHTTPRequestHandler, location: str) -> None:
        h.send_response(302)
        h.send_header("Location", location)
        h.send_header("Content-Length", "0")
        h.end_headers()

    @staticmethod
    def _drip(h: BaseHTTPRequestHandler) -> None:
        body = image_bytes(4242)
        h.send_response(200)
        h.send_header("Content-Type", "image/jpeg")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        deadline = time.monotonic() + 20
        try:
            for i in range(len(body)):
                if time.monotonic() > deadline:
                    break
                h.wfile.write(body[i : i + 1])
                h.wfile.flush()
                time.sleep(0.2)
        except OSError:
            pass
        h.close_connection = True

    @staticmethod
    def _endless(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "image/jpeg")
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        chunk = b"\xff\xd8\xff\xe0" + bytes(64 * 1024)
        try:
            for _ in range(4096):  # bounded: 256 MiB at most
                h.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
        except OSError:
            pass
        h.close_connection = True
