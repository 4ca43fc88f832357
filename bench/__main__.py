"""Run benchmarks and update bench/RESULTS.md.

    python -m bench                 # every bench/bench_*.py
    python -m bench storage ingest  # only these

A benchmark module defines ``run(workdir: Path) -> Section``. Its section in RESULTS.md is
replaced; the other sections stay as they were, each with the command and date that made it.
"""

from __future__ import annotations

import argparse
import importlib
import tempfile
from pathlib import Path

from bench.report import Section, machine_summary, write_section

BENCH_DIR = Path(__file__).resolve().parent


def available() -> list[str]:
    """Names of the benchmarks in bench/ (bench_<name>.py)."""
    return sorted(p.stem.removeprefix("bench_") for p in BENCH_DIR.glob("bench_*.py"))


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help=f"benchmarks to run (default: all of {available()})")
    parser.add_argument("--results", type=Path, default=BENCH_DIR / "RESULTS.md")
    args = parser.parse_args()
    for name in args.names or available():
        module = importlib.import_module(f"bench.bench_{name}")
        with tempfile.TemporaryDirectory(prefix=f"lancetag-bench-{name}-") as tmp:
            section: Section = module.run(Path(tmp))
        write_section(
            args.results, name, section, command=f"python -m bench {name}", machine=machine_summary()
        )
        print(section.markdown)


if __name__ == "__main__":
    main()
