"""``id_hashes``: the 64-bit id hash that buckets a diff's moved rows and finds repeated ids."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import numpy as np
import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st

from lance_io.schema import id_hashes

MASK = (1 << 64) - 1


def _mix(h: int) -> int:
    h ^= h >> 33
    h = (h * 0xFF51AFD7ED558CCD) & MASK
    h ^= h >> 33
    h = (h * 0xC4CEB9FE1A85EC53) & MASK
    return h ^ (h >> 33)


def reference_hash(value: bytes | None) -> int:
    """The documented hash, one id at a time in plain Python: length, then 8-byte little-endian words."""
    value = value or b""
    h = ((len(value) + 1) * 0x9E3779B97F4A7C15) & MASK
    padded = value + b"\0" * (-len(value) % 8)
    for start in range(0, len(padded), 8):
        h = _mix(h ^ int.from_bytes(padded[start : start + 8], "little"))
    h = _mix(h)
    return h - (1 << 64) if h >= 1 << 63 else h


ids = st.lists(st.one_of(st.none(), st.text(max_size=40), st.text(alphabet="0123456789abcdef", min_size=32, max_size=32)),
               max_size=60)


@settings(max_examples=200, deadline=None)
@given(values=ids, cut=st.integers(0, 60), kind=st.sampled_from([pa.string(), pa.large_string(), pa.string_view()]))
def test_each_id_hashes_as_the_documented_formula_whatever_its_chunk_type_or_neighbours(values, cut, kind):
    array = pa.array(values, type=kind)
    expected = [reference_hash(v.encode() if v is not None else None) for v in values]
    assert id_hashes(array).tolist() == expected
    assert id_hashes(pa.chunked_array([array[:cut], array[cut:]], type=kind)).tolist() == expected
    assert id_hashes(pa.array(values, type=pa.string()).cast(pa.binary())).tolist() == expected
    assert id_hashes(pa.array(values, type=pa.string()).dictionary_encode()).tolist() == expected


def test_a_slice_hashes_its_own_rows_and_a_long_id_next_to_short_ones_hashes_alike():
    values = [hashlib.sha256(str(i).encode()).hexdigest()[:32] for i in range(3000)] + ["x" * 100_000, "", None]
    array = pa.array(values)
    whole = id_hashes(array)
    assert id_hashes(array.slice(1000, 500)).tolist() == whole[1000:1500].tolist()
    assert whole[-3] == reference_hash(b"x" * 100_000)
    assert whole[-2] == whole[-1] == reference_hash(b"")  # a null hashes like the empty id


def test_distinct_ids_spread_evenly_over_buckets_and_do_not_collide():
    hashes = id_hashes(pa.array([hashlib.sha256(str(i).encode()).hexdigest()[:32] for i in range(200_000)]))
    assert len(np.unique(hashes)) == len(hashes)
    counts = np.bincount(hashes % 256, minlength=256)
    assert counts.min() > 0.85 * len(hashes) / 256 and counts.max() < 1.15 * len(hashes) / 256


def test_integer_ids_hash_by_value_and_the_hash_is_the_same_in_another_process():
    assert id_hashes(pa.array([7, 7, 8])).tolist()[0] == id_hashes(pa.array([7, 7, 8])).tolist()[1]
    assert len(set(id_hashes(pa.array(range(10_000))).tolist())) == 10_000
    program = "import pyarrow as pa; from lance_io.schema import id_hashes; print(id_hashes(pa.array(['a', 'b'])).tolist())"
    other = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, check=True).stdout
    assert other.strip() == str(id_hashes(pa.array(["a", "b"])).tolist())
