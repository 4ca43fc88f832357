"""A process that fills a `label` column with grouped commits (lance_io.columns.fill_column), for crash tests.

    python -m tests.fragment_writer URI COMPUTED_LOG [--delay SECONDS] [--commit-rows N]

Every id it computes is appended to COMPUTED_LOG (one per line, flushed) before it commits.
"""

from __future__ import annotations

import argparse
import time

import pyarrow as pa

from lance_io.columns import fill_column

OUTPUT = pa.schema([pa.field("label", pa.string()), pa.field("label_len", pa.int32())])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("uri")
    parser.add_argument("log")
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--commit-rows", type=int, default=4096)
    parser.add_argument("--tag", default="L")
    args = parser.parse_args()

    with open(args.log, "a") as log:

        def compute(batch: pa.RecordBatch) -> pa.RecordBatch:
            time.sleep(args.delay)
            ids = batch.column("id").to_pylist()
            log.write("".join(f"{i}\n" for i in ids))
            log.flush()
            labels = [f"{args.tag}-{len(b)}" for b in batch.column("image").to_pylist()]
            return pa.record_batch([pa.array(labels), pa.array([len(x) for x in labels], pa.int32())], schema=OUTPUT)

        fill_column(
            args.uri,
            compute,
            read_columns=["image"],
            output_schema=OUTPUT,
            todo="label IS NULL",
            batch_size=8,
            commit_rows=args.commit_rows,
            properties={"lancetag.job": "fragment_writer"},
        )

if __name__ == "__main__":
    main()
