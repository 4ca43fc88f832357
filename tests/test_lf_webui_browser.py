"""The real LlamaBoard (gradio) from .venv-webui, driven in headless Chromium.

``.venv-webui/bin/lancetag webui`` serves LlamaBoard on a free 127.0.0.1 port with a dataset_dir
holding a registered Lance table (three rows per fragment, so preview pages cross fragments)
and a native LLaMA-Factory dataset. ``tests/llamaboard_browser.py`` runs in .venv-webui (where
Playwright is) and clicks through the page in the system's Chromium, as a person would.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest

from bench.data import digit_images, write_native, write_table
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow  # about 45 s: most of it the server importing torch and LLaMA-Factory

WEBUI_BIN = REPO_ROOT / ".venv-webui" / "bin"
DRIVER = REPO_ROOT / "tests" / "llamaboard_browser.py"
START_TIMEOUT_S = 120  # importing torch, transformers and LLaMA-Factory takes 15-25 s on 2 busy cores
PROMPT = "<image>Fill in the blank: this is a photo of a {}"


@dataclass(frozen=True)
class Board:
    """A running LlamaBoard: its URL, server process, dataset_dir and a folder for screenshots."""

    url: str
    process: subprocess.Popen
    dataset_dir: Path
    out: Path


def _free_port() -> int:
    """Return a TCP port that is free on 127.0.0.1 now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_until_serving(url: str, process: subprocess.Popen, log: Path) -> None:
    """Return once ``url`` answers 200; fail with the server's log if it exits or never answers."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"lancetag webui exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    pytest.fail(f"lancetag webui did not answer within {START_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def board(tmp_path_factory) -> Iterator[Board]:
    """LlamaBoard served by ``.venv-webui/bin/lancetag webui`` over a Lance and a native dataset."""
    if not (WEBUI_BIN / "lancetag").exists():
        if os.environ.get("CI"):
            pytest.fail(".venv-webui is missing: CI must set up all environments (scripts/setup.sh all)")
        pytest.skip(".venv-webui is not set up (run `scripts/setup.sh webui`)")
    if shutil.which("chromium") is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    from llamafactory_ext.register import register_dataset

    root = tmp_path_factory.mktemp("llamaboard")
    dataset_dir = root / "data"
    images = digit_images(5)
    write_table(root / "digits.lance", images, rows_per_file=3)
    register_dataset(str(root / "digits.lance"), "digits_lance", dataset_dir)
    rows = [{"messages": [{"role": "user", "content": "<image>hi"}, {"role": "assistant", "content": "7"}]}]
    write_native(dataset_dir, "native", rows, [images[0][0]])

    port = _free_port()
    log = root / "webui.log"
    command = [str(WEBUI_BIN / "lancetag"), "webui", "--port", str(port), "--dataset-dir", str(dataset_dir)]
    with log.open("w") as out:  # cwd: LlamaBoard writes llamaboard_cache/ and saves/ there
        process = subprocess.Popen(command, cwd=root, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        _wait_until_serving(url, process, log)
        yield Board(url, process, dataset_dir, root)
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def look(board: Board, dataset: str, *wanted: str) -> dict:
    """Return what the browser driver saw (see tests/llamaboard_browser.py); a screenshot goes to board.out."""
    shot = board.out / f"{dataset}.png"
    command = [str(WEBUI_BIN / "python"), str(DRIVER), board.url, dataset, str(shot), *wanted]
    done = subprocess.run(command, capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, f"browser driver failed (screenshot {shot}):\n{done.stderr[-3000:]}"
    return json.loads(done.stdout)


def test_lancetag_webui_binds_127_0_0_1_only(board):
    listening = [
        c.laddr
        for c in psutil.Process(board.process.pid).net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN
    ]
    assert listening, "the web UI process listens on nothing"
    assert {addr.ip for addr in listening} == {"127.0.0.1"}


def test_llamaboard_in_chromium_lists_a_lance_dataset_and_pages_through_its_preview(board):
    seen = look(board, "digits_lance", "this is a photo of 1.", "this is a photo of 3.")

    assert seen["data_dir"] == str(board.dataset_dir)  # from --dataset-dir
    assert sorted(seen["choices"]) == ["digits_lance", "native"]
    assert seen["count"] == 5
    first, second = seen["pages"]
    assert PROMPT in first and '"this is a photo of 0."' in first and '"this is a photo of 1."' in first
    assert '"this is a photo of 2."' in second and '"this is a photo of 3."' in second  # across fragments
    assert "photo of 0." not in second
    assert '"<image: ' in first  # images are described, not sent as bytes


@pytest.mark.long  # stock LLaMA-Factory's own datasets (10 s); ours stay in the default run
def test_llamaboard_in_chromium_previews_native_datasets_too(board):
    seen = look(board, "native", '"7"')

    assert seen["count"] == 1
    assert '"<image>hi"' in seen["pages"][0]
    assert str(board.dataset_dir / "images" / "0.png") in seen["pages"][0]
