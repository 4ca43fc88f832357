"""Builders of real image tables for tests: small PNGs, rows in the image table schema."""

from __future__ import annotations

import io
import random
from datetime import UTC, datetime

import pyarrow as pa
from PIL import Image, ImageOps

from bench.data import png_bytes
from lance_io.schema import IMAGE_SCHEMA, content_hashes


def image_rows(seeds: range | list[int], *, truth: bool = True, padding: int = 0) -> pa.Table:
    """Rows in IMAGE_SCHEMA (plus ``truth``) for PNGs of the given seeds; ``padding`` adds bytes."""
    records = []
    for seed in seeds:
        data = png_bytes(seed) + random.Random(seed).randbytes(padding)  # incompressible
        row_id, sha = content_hashes(data)
        records.append(
            {
                "id": row_id,
                "image": data,
                "sha256": sha,
                "size_bytes": len(data),
                "width": 16,
                "height": 16,
                "format": "PNG",
                "mode": "RGB",
                "exif_orientation": None,
                "frames": 1,
                "source": f"test://{seed}",
                "source_kind": "test",
                "ingested_at": datetime.now(UTC),
                "ingest_job": "test",
                **({"truth": str(seed % 3)} if truth else {}),
            }
        )
    schema = pa.schema(list(IMAGE_SCHEMA) + ([pa.field("truth", pa.string())] if truth else []))
    return pa.Table.from_pylist(records, schema=schema)


def image_page_bytes(uri: str) -> list[int]:
    """Bytes of each page of the ``image`` column, over the table's data files."""
    import lance
    from lance.file import LanceFileReader

    ds = lance.dataset(uri)
    column = ds.schema.names.index("image")
    return [sum(b.size for b in page.buffers)
            for fragment in ds.get_fragments() for data_file in fragment.data_files()
            for page in LanceFileReader(f"{uri}/data/{data_file.path}").metadata().columns[column].pages]


def turned_photo(size: tuple[int, int] = (120, 90)) -> tuple[bytes, Image.Image]:
    """A JPEG stored on its side with EXIF orientation 6 (a phone's portrait photo), and how a viewer shows it."""
    stored = Image.radial_gradient("L").resize(size).convert("RGB")
    stored.paste((250, 20, 20), (0, 0, size[0] // 3, size[1] // 4))  # a red corner: a turn moves it
    exif = Image.Exif()
    exif[0x0112] = 6
    out = io.BytesIO()
    stored.save(out, format="JPEG", quality=95, exif=exif.tobytes())
    return out.getvalue(), ImageOps.exif_transpose(Image.open(io.BytesIO(out.getvalue()))).convert("RGB")
