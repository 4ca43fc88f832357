"""Deterministic splits by id hash: the same row lands in the same split in every run and on every node.

One function for every split the product makes: the demo's train/test, and the extension's
train/validation inside a training split. A ``salt`` makes a second split independent of the
first (validation is drawn from the training rows, not from the held-out bucket).

Example::

    split_of("3fa2...", 0.2, held_out="test")                                  # "test" or "train"
    split_of("3fa2...", 0.1, held_out="validation", salt="validation")         # "validation" or "train"
"""

from __future__ import annotations

import hashlib


def id_bucket(row_id: str, salt: str = "") -> float:
    """Return a number in [0, 1) fixed by ``salt`` and ``row_id`` (first 64 bits of their sha256)."""
    digest = hashlib.sha256(f"{salt}{row_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_of(row_id: str, fraction: float, *, held_out: str, salt: str = "") -> str:
    """Return ``held_out`` for a ``fraction`` of ids (chosen by hash), ``"train"`` for the rest."""
    return held_out if id_bucket(row_id, salt) < fraction else "train"
