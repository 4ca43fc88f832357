"""Drive a running LlamaBoard in headless Chromium; print what a person would see, as JSON.

Run by ``tests/test_lf_webui_browser.py`` with ``.venv-webui``'s Python (Playwright lives there,
not in ``.venv``); the browser is the system's Chromium, never a downloaded one::

    .venv-webui/bin/python tests/llamaboard_browser.py URL DATASET SCREENSHOT.png TEXT [TEXT ...]

On the Train tab it opens the Dataset dropdown, picks DATASET, clicks "Preview dataset" and
expands the samples until the first TEXT shows, then clicks "Next" for each further TEXT.
Requests to anything but URL's host (gradio's web fonts, a CDN script) are aborted, so the
page never reaches outside the machine.
"""

from __future__ import annotations

import json
import re
import sys
import time
from urllib.parse import urlsplit

from playwright.sync_api import Page, sync_playwright

CHROMIUM = "/usr/bin/chromium"
TIMEOUT_MS = 20_000


def _preview_text(page: Page, wanted: str) -> str:
    """Return the preview box's text once it shows ``wanted``, expanding collapsed JSON nodes."""
    box = page.locator(".modal-box").filter(visible=True)
    deadline = time.monotonic() + TIMEOUT_MS / 1000
    while time.monotonic() < deadline:
        collapsed = box.get_by_role("button", name="Expand", exact=True)
        while collapsed.count():
            collapsed.first.click()
        text = re.sub(r"\s+", " ", box.inner_text())
        if wanted in text:
            return text
        page.wait_for_timeout(200)
    raise TimeoutError(f"preview never showed {wanted!r}; it shows: {box.inner_text()[:500]!r}")


def look(url: str, dataset: str, screenshot: str, wanted: list[str]) -> dict:
    """Return what the Train tab shows: Data dir, dataset choices, preview count, one text per page."""
    origin = "{0.scheme}://{0.netloc}/".format(urlsplit(url))
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.set_default_timeout(TIMEOUT_MS)
        page.route("**/*", lambda r: r.continue_() if r.request.url.startswith(origin) else r.abort())
        try:
            page.goto(url)
            data_dir = page.get_by_label("Data dir").filter(visible=True)
            dropdown = page.get_by_label("Dataset", exact=True).filter(visible=True)
            dropdown.click()  # LlamaBoard lists dataset_info.json entries when the dropdown gets focus
            page.get_by_role("option").first.wait_for()
            choices = page.get_by_role("option").all_inner_texts()
            page.get_by_role("option", name=dataset, exact=True).click()
            preview = page.get_by_role("button", name="Preview dataset")
            page.wait_for_function("el => !el.disabled", arg=preview.element_handle())
            preview.click()
            pages = [_preview_text(page, wanted[0])]
            count = page.locator(".modal-box").filter(visible=True).get_by_role("spinbutton").first
            for text in wanted[1:]:
                page.get_by_role("button", name="Next", exact=True).click()
                pages.append(_preview_text(page, text))
            return {
                "data_dir": data_dir.input_value(),
                "choices": choices,
                "count": int(count.input_value()),
                "pages": pages,
            }
        finally:
            page.screenshot(path=screenshot, full_page=True)
            browser.close()


if __name__ == "__main__":
    print(json.dumps(look(*sys.argv[1:4], sys.argv[4:])))
