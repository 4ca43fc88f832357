"""``LabelerClient`` against servers that are not a lancetag labeler: one reason, never a crash or a
silently short answer. The servers are test doubles over real HTTP (a labeler's real answers are
checked against the Serve app in tests/test_serve_app.py)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from lance_io.tasks import load_task
from serve_apps.client import LabelerClient, NotALabeler
from serve_apps.results import ErrorCode, Provenance, error_result

TASK = load_task("digits")
RECORD = error_result(TASK, Provenance("m", None, TASK.prompt_hash(), "random"), ErrorCode.IMAGE_DECODE_FAILED, "junk").model_dump(mode="json")
INFO = {"task": {"name": "digits"}, "task_hash": TASK.prompt_hash(), "backend": {"model": "m", "views": 1}, "limits": {}}


@contextmanager
def answering(info: bytes | object, label: bytes | object) -> Iterator[str]:
    """An HTTP server on 127.0.0.1 answering 200 with ``info`` to GET and ``label`` to POST."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _send(self, body: bytes | object) -> None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            self._send(info)

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            self._send(label)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


NOT_A_LABELER = {
    "an HTML page": (b"<html><body>It works!</body></html>", b"<html></html>", "the body"),
    "a list": ([], [], "the body"),
    "another JSON API": ({"data": [{"id": "m"}]}, {"choices": []}, "task"),
    "records of another shape": (INFO | {"task_hash": 7}, {"results": [{"label": "7"}]}, "task_hash"),
}


@pytest.mark.parametrize(("info", "label", "field"), NOT_A_LABELER.values(), ids=NOT_A_LABELER.keys())
def test_a_server_that_is_not_a_labeler_is_not_a_labeler_on_info_and_label(info, label, field):
    with answering(info, label) as url:
        client = LabelerClient.over_http(url, timeout_s=5)
        with pytest.raises(NotALabeler) as on_info:
            client.info()
        with pytest.raises(NotALabeler) as on_label:
            client.label([b"x"])
    assert on_info.value.reason == "not_a_labeler" and f"({field}:" in on_info.value.message
    assert "lancetag serve" in on_label.value.message


def test_a_labeler_answering_another_number_of_records_than_images_is_refused_not_zipped():
    with answering(INFO, {"results": [RECORD, RECORD]}) as url:
        client = LabelerClient.over_http(url, timeout_s=5)
        assert client.info()["task_hash"] == TASK.prompt_hash()
        assert [r.error for r in client.label([b"a", b"b"])] == ["image_decode_failed"] * 2
        with pytest.raises(NotALabeler, match="answered 2 results for 3 images"):
            client.label([b"a", b"b", b"c"])
