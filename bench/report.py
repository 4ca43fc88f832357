"""Sections of bench/RESULTS.md: one per benchmark, replaced in place when it reruns."""

from __future__ import annotations

import os
import platform
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

HEADER = "# Benchmark results\n\nEach section names the command that produced it. Ratios are measured side by side in one run.\n"


@dataclass
class Section:
    """What one benchmark reports: a title and a markdown body (tables, figures)."""

    title: str
    markdown: str


def table_section(title: str, doc: str | None, table: list[str], summary: str) -> Section:
    """A benchmark's section: its module docstring past the title and command, its table, then ``summary``."""
    description = (doc or "").split("\n\n", 2)[2].strip()
    return Section(title=title, markdown="\n".join([description, "", *table, "", summary]))


def machine_summary() -> str:
    """One line describing the machine the figures come from."""
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    return f"{platform.machine()}, {os.cpu_count()} cores, {mem_gib:.0f} GiB RAM, Python {platform.python_version()}"


def write_section(results: Path, name: str, section: Section, *, command: str, machine: str) -> None:
    """Replace (or add) the section `name` in `results`, stamped with command, machine and date."""
    text = results.read_text() if results.exists() else HEADER
    date = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    block = (
        f"<!-- bench:{name} -->\n## {section.title}\n\n"
        f"`{command}` on {date} ({machine})\n\n{section.markdown.strip()}\n<!-- /bench:{name} -->\n"
    )
    pattern = re.compile(rf"<!-- bench:{re.escape(name)} -->.*?<!-- /bench:{re.escape(name)} -->\n", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + block
    results.write_text(text)
