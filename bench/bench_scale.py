"""Tables at scale: how each cost of the pipeline grows with the table (issue 19).

The same pipeline at each size (default 10k, 100k and 1M rows; ``LANCETAG_BENCH_SCALE_SIZES``
overrides, e.g. ``10000,100000``), each on a fresh table, every step a real ``lancetag``
process whose wall time and peak RSS (sampled every 50 ms, the process alone) are measured:

1. ingest N distinct real small images (scikit-learn digits at 28x28 with seeded noise, so
   every image's content differs), a folder of 1,000 images per source argument;
2. a full labeling run against a long-lived labeler with the ``random`` backend (seed 004's
   demo scorer: model time is nil, so the run's time is the platform's overhead); the
   per-row cost is the marginal one, (full run - 1% run) / (rows - 1% rows), so the fixed
   cost of a run (starting its Ray cluster, planning) is reported apart;
3. append 1% more images, then a labeling run (only the new rows cost work);
4. a 1% relabel spread over every fragment (``--where`` on an id range, ``--relabel`` with a
   second scorer so the provenance differs);
5. ``lancetag show``, ``versions``, ``diff``, ``query --where`` latency (whole command and
   library call);
6. the LLaMA-Factory extension's streaming reader: time to the first batch and peak RSS;
7. versions and metadata bytes each run created, bytes on disk per row.

Each figure is reported at every size with its growth, the figure at the largest size divided by
the one at the smallest: for the per-row figures (images/s, ms per row, bytes per row, RSS,
latencies) 1.0 means independent of the table; totals (seconds, versions, bytes of a run) grow
with the rows they cover.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from bench.report import Section

REPO = Path(__file__).resolve().parent.parent
LANCETAG = [sys.executable, "-m", "ray_jobs.cli"]
DEFAULT_SIZES = (10_000, 100_000, 1_000_000)
PART = 1_000  # images per folder (one source argument each)
DATA_CACHE = Path(os.environ.get("LANCETAG_BENCH_SCALE_DATA", "/tmp/lancetag-bench-scale-images"))
ONE_PERCENT_IDS = "id < '028f5c28'"  # ids are hex sha256 prefixes: 0x028f5c28 / 2**32 = 1.0%
LABEL_FLAGS = ["--task", "quality", "--batch-size", "64", "--concurrency", "2"]


def sizes() -> list[int]:
    """Return the table sizes to measure (``LANCETAG_BENCH_SCALE_SIZES``, comma-separated)."""
    given = os.environ.get("LANCETAG_BENCH_SCALE_SIZES")
    return [int(s) for s in given.split(",")] if given else list(DEFAULT_SIZES)


@dataclass
class Measured:
    """One process: wall seconds, its peak resident memory and what it printed."""

    seconds: float
    peak_rss: int
    stdout: str


def run_measured(args: list[str], *, env: dict[str, str] | None = None) -> Measured:
    """Run ``args`` to completion, sampling the process's RSS; raise with its stderr if it fails."""
    import psutil

    started = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        try:
            handle = psutil.Process(proc.pid)
            while not stop.is_set():
                peak = max(peak, handle.memory_info().rss)
                time.sleep(0.05)
        except psutil.Error:
            return

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    stop.set()
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:6])} ... exited {proc.returncode}: {err[-2000:]}")
    return Measured(time.perf_counter() - started, peak, out)


def _write_part(args: tuple[Path, int]) -> None:
    """Write images ``start .. start+PART`` into folder ``out`` (skips a folder already complete)."""
    import io

    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    out, start = args
    if out.is_dir() and len(list(out.iterdir())) == PART:
        return
    out.mkdir(parents=True, exist_ok=True)
    digits = load_digits().images
    for k in range(start, start + PART):
        rng = np.random.default_rng(k)
        base = np.kron(digits[k % len(digits)] * 255 / 16, np.ones((3, 3)))[:, :]  # 24x24
        pixels = np.zeros((28, 28))
        pixels[2:26, 2:26] = base
        pixels = np.clip(pixels + rng.integers(-12, 13, size=pixels.shape), 0, 255).astype("uint8")
        buffer = io.BytesIO()
        Image.fromarray(pixels, mode="L").save(buffer, format="PNG")
        (out / f"{k:07d}.png").write_bytes(buffer.getvalue())


def image_parts(count: int) -> list[Path]:
    """Return folders holding ``count`` distinct images (written once, cached across runs)."""
    from multiprocessing import Pool

    parts = [(DATA_CACHE / f"part-{p:05d}", p * PART) for p in range((count + PART - 1) // PART)]
    with Pool(os.cpu_count() or 2) as pool:
        pool.map(_write_part, parts)
    return [p for p, _ in parts]


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def _metadata_bytes(table: Path) -> int:
    return _dir_bytes(table / "_versions") + _dir_bytes(table / "_transactions")


def _version_count(table: Path) -> int:
    import lance

    return len(lance.dataset(str(table)).versions())


class Labeler:
    """A long-lived ``lancetag serve`` process with the random scorer, as a platform runs one."""

    def __init__(self, model: str, port: int) -> None:
        args = [*LANCETAG, "serve", "--task", "quality", "--backend", "random", "--model", model,
                "--port", str(port), "--batch-size", "64", "--app-name", f"bench-{model}", "--json"]
        self.process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPO)
        line = self.process.stdout.readline() if self.process.stdout else ""
        if not line:
            raise RuntimeError(f"the labeler {model} did not start")
        self.url = json.loads(line)["url"]

    def stop(self) -> None:
        """Stop serving (Ctrl-C, as a person would) and wait for the process."""
        import signal

        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()


def _label(table: Path, labeler: Labeler, *extra: str) -> tuple[Measured, dict, int, int]:
    """Run one labeling run; return it, its summary, versions and metadata bytes it created."""
    versions, meta = _version_count(table), _metadata_bytes(table)
    run = run_measured([*LANCETAG, "label", str(table), *LABEL_FLAGS, "--serve", labeler.url, "--json", *extra])
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    return run, summary, _version_count(table) - versions, _metadata_bytes(table) - meta


def _pad_versions(table: Path, at_least: int) -> int:
    """Add metadata-only commits until the table has ``at_least`` versions; return how many exist."""
    import lance

    ds = lance.dataset(str(table))
    for i in range(max(0, at_least - len(ds.versions()))):
        ds.update_config({"lancetag.bench.pad": str(i)})
    return len(lance.dataset(str(table)).versions())


def _first_stream_batch(table: Path) -> Measured:
    code = (
        "import time; t=time.perf_counter();"
        "from llamafactory_ext.source import LanceSource; from llamafactory_ext.reader import stream_rows;"
        f"src=LanceSource(uri={str(table)!r}, label_column='label', task='quality');"
        "it=iter(stream_rows(src)); next(it);"
        "print(time.perf_counter()-t)"
    )
    return run_measured([sys.executable, "-c", code])


def measure_size(n: int, workdir: Path, scorers: tuple[Labeler, Labeler]) -> dict[str, float]:
    """Run the whole pipeline on a fresh table of ``n`` rows; return its figures."""
    table = workdir / f"scale-{n}.lance"
    parts = image_parts(n + n // 100)
    main, extra = parts[: n // PART], parts[n // PART :]
    fig: dict[str, float] = {}

    ingest = run_measured([*LANCETAG, "ingest", *map(str, main), "--table", str(table), "--json"])
    report = json.loads(ingest.stdout.strip().splitlines()[-1])
    fig["ingest_wall_s"] = ingest.seconds
    fig["ingest_job_s"] = report["seconds"]
    fig["ingest_images_per_s"] = report["added"] / report["seconds"]
    fig["ingest_driver_rss_mib"] = ingest.peak_rss / 2**20

    full, summary, versions, meta = _label(table, scorers[0])
    full_rows = summary["labeled"]
    fig["label_wall_s"] = full.seconds
    fig["label_job_s"] = summary["seconds"]
    fig["label_versions"] = versions
    fig["label_metadata_kib"] = meta / 1024
    fig["label_driver_rss_mib"] = full.peak_rss / 2**20

    run_measured([*LANCETAG, "ingest", *map(str, extra), "--table", str(table), "--json"])
    _, summary, versions, _ = _label(table, scorers[0])
    fig["append_label_job_s"] = summary["seconds"]
    fig["append_label_share_of_full"] = summary["seconds"] / fig["label_job_s"]
    fig["append_label_versions"] = versions
    marginal = (fig["label_job_s"] - summary["seconds"]) / max(1, full_rows - summary["labeled"])
    fig["label_overhead_ms_per_row"] = 1000 * marginal

    _, summary, versions, meta = _label(table, scorers[1], "--where", ONE_PERCENT_IDS, "--relabel")
    fig["spread_relabel_rows"] = summary["labeled"]
    fig["spread_relabel_job_s"] = summary["seconds"]
    fig["spread_relabel_versions"] = versions
    fig["spread_relabel_metadata_kib"] = meta / 1024

    fig["versions_total"] = _pad_versions(table, 1000)
    for name, args in {
        "show": ["show", str(table), "--json"],
        "versions": ["versions", str(table), "--json"],
        "diff": ["diff", str(table), "1", str(fig["versions_total"]), "--json"],
        "query": ["query", str(table), "--where", "label >= 90", "--limit", "20", "--json"],
    }.items():
        fig[f"{name}_cli_s"] = run_measured([*LANCETAG, *args]).seconds
    first = _first_stream_batch(table)
    fig["stream_first_batch_s"] = float(first.stdout.strip())
    fig["stream_rss_mib"] = first.peak_rss / 2**20
    fig["bytes_per_row"] = _dir_bytes(table) / (n + n // 100)
    import shutil

    shutil.rmtree(table, ignore_errors=True)
    return fig




def run(workdir: Path) -> Section:
    """Measure every size and return the section for RESULTS.md."""
    scorers = (Labeler("random-scorer-a", 8611), Labeler("random-scorer-b", 8612))
    results = {}
    try:
        for n in sizes():
            results[n] = measure_size(n, workdir, scorers)
            print(json.dumps({"rows": n, **results[n]}), flush=True)  # a long run's figures survive an interruption
    finally:
        for scorer in scorers:
            scorer.stop()
    ns = sorted(results)
    header = "| figure | " + " | ".join(f"{n:,} rows" for n in ns) + " | largest / smallest |"
    lines = [header, "|" + " --- |" * (len(ns) + 2)]
    for key in results[ns[0]]:
        values = [results[n][key] for n in ns]
        growth = values[-1] / values[0] if values[0] else float("nan")
        lines.append(f"| {key} | " + " | ".join(f"{v:,.3g}" for v in values) + f" | {growth:.2f}x |")
    return Section("Tables at scale: cost per row against table size", "\n".join(lines))
