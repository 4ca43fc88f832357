"""Small real image data shared by benchmarks and tests: scikit-learn digits and distinct PNGs, Lance
tables of them, and matching native LLaMA-Factory (sharegpt JSON + image files) datasets.

It lives here, not under ``tests/``, because benchmarks use it too and ``bench`` imports nothing
from ``tests``.
"""

from __future__ import annotations

import io
import json
import random
from datetime import UTC, datetime
from pathlib import Path

import lance
import pyarrow as pa
from PIL import Image

from lance_io.schema import IMAGE_SCHEMA, OPTIONAL_FIELDS, TRUTH, content_hashes
from llamafactory_ext.source import SHAREGPT_TAGS


def png_bytes(seed: int, size: int = 16) -> bytes:
    """Return a distinct small PNG for each seed."""
    rng = random.Random(seed)
    image = Image.new("RGB", (size, size), (rng.randrange(256), rng.randrange(256), rng.randrange(256)))
    image.putpixel((seed % size, (seed // size) % size), (seed % 256, (seed * 7) % 256, (seed * 13) % 256))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def digit_images(n: int, *, start: int = 0, size: int = 56) -> list[tuple[bytes, str]]:
    """Return ``n`` scikit-learn digits as ``(PNG bytes, label)``, upscaled nearest-neighbour to ``size``."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    out = []
    for i in range(start, start + n):
        pixels = (digits.images[i] * (255 / 16)).astype("uint8")
        image = Image.fromarray(pixels, mode="L").resize((size, size), Image.NEAREST).convert("RGB")
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        out.append((buf.getvalue(), str(int(digits.target[i]))))
    return out


def image_rows(images: list[tuple[bytes, str]], *, source_prefix: str = "digits") -> pa.Table:
    """Return rows in IMAGE_SCHEMA (+ ``truth``) for ``(bytes, label)`` pairs."""
    now = datetime.now(UTC)
    columns: dict[str, list] = {name: [] for name in [*IMAGE_SCHEMA.names, TRUTH]}
    for i, (data, label) in enumerate(images):
        row_id, sha = content_hashes(data)
        values = {
            "id": row_id,
            "image": data,
            "sha256": sha,
            "size_bytes": len(data),
            "width": 56,
            "height": 56,
            "format": "PNG",
            "mode": "RGB",
            "exif_orientation": None,
            "frames": 1,
            "source": f"{source_prefix}/{i}.png",
            "source_kind": "folder",
            "ingested_at": now,
            "ingest_job": "test",
            TRUTH: label,
        }
        for key, value in values.items():
            columns[key].append(value)
    schema = pa.schema([*IMAGE_SCHEMA, OPTIONAL_FIELDS[TRUTH]])
    return pa.table(columns, schema=schema)


def write_table(
    uri: str | Path, images: list[tuple[bytes, str]], *, mode: str = "create", rows_per_file: int = 1024
):
    """Write (or append) image rows to a Lance table; return the dataset."""
    return lance.write_dataset(image_rows(images), str(uri), mode=mode, max_rows_per_file=rows_per_file)


def write_native(folder: Path, name: str, rows: list[dict], images: list[bytes]) -> Path:
    """Write a native sharegpt JSON + image files dataset, with its own dataset_info.json entry."""
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for i, (row, data) in enumerate(zip(rows, images, strict=True)):
        path = folder / "images" / f"{i}.png"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(data)
        records.append({"messages": row["messages"], "images": [str(path)]})
    write_sharegpt(folder, name, records)
    return folder


def write_sharegpt(folder: Path, name: str, records: list[dict]) -> Path:
    """Write ``NAME.json`` (sharegpt records) and its entry in ``folder/dataset_info.json``, keeping other entries; return the JSON path."""
    path = folder / f"{name}.json"
    path.write_text(json.dumps(records, ensure_ascii=False))
    info_path = folder / "dataset_info.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    info[name] = {
        "file_name": path.name,
        "formatting": "sharegpt",
        "columns": {"messages": "messages", "images": "images"},
        "tags": dict(SHAREGPT_TAGS),
    }
    info_path.write_text(json.dumps(info, indent=2, ensure_ascii=False))
    return path
