"""``LabelerClient``: label image bytes through a running labeler, over HTTP or a DeploymentHandle.

Both paths return the same :class:`~serve_apps.results.LabelResult` records, one per image, in
order. Over HTTP, connection errors and 503/429 answers are retried (honouring ``Retry-After``);
undecodable images come back as error records (``on_invalid: record``), not as a failed batch.
A request unanswered after ``timeout_s`` (no replica can run: its nodes lost; or a labeler stuck)
raises ``LabelerUnavailable`` with reason ``labeler_unavailable`` at once, not retried: waiting
again would only multiply the wait.

Example::

    client = LabelerClient.over_http("http://127.0.0.1:8000", token=os.environ.get("LABELER_TOKEN"))
    client = LabelerClient.over_handle("lancetag-labeler")   # inside the Ray cluster
    results = client.label([png_bytes, jpeg_bytes])
"""

from __future__ import annotations

import base64
from typing import Any

import httpx
from pydantic import BaseModel, ConfigDict, ValidationError
from tenacity import RetryCallState, retry, retry_if_exception, stop_after_attempt, wait_exponential

from lance_io.reasons import ReasonError, first_problem
from serve_apps.results import LabelResult


class LabelerUnavailable(ReasonError):
    """The labeler could not be reached (``labeler_unreachable``), answered 503/429 (``labeler_busy``)
    or did not answer within the client's timeout (``labeler_unavailable``)."""

    def __init__(self, message: str, retry_after_s: float | None = None, reason: str = "labeler_busy") -> None:
        super().__init__(reason, message)
        self.retry_after_s = retry_after_s


class LabelerRequestError(ReasonError):
    """The labeler refused the request (4xx): the message says what to change; retrying will not help."""

    def __init__(self, message: str) -> None:
        super().__init__("labeler_refused", message)


class NotALabeler(ReasonError):
    """The server answered, but not as a lancetag labeler does (another kind of server at that URL)."""

    def __init__(self, message: str) -> None:
        super().__init__("not_a_labeler", message)


class LabelerInfo(BaseModel):
    """What the job reads of a labeler's ``/info`` (the rest is kept as sent)."""

    model_config = ConfigDict(extra="allow")
    task: dict[str, Any]
    task_hash: str
    backend: dict[str, Any]


class LabelReply(BaseModel):
    """A labeler's answer to ``/label``."""

    results: list[LabelResult]


def _read_reply(response: httpx.Response, model: type[BaseModel], what: str) -> Any:
    """Parse ``response`` as ``model``; raise NotALabeler naming the first wrong field when it is not one."""
    try:
        return model.model_validate_json(response.content)
    except ValidationError as exc:
        raise NotALabeler(
            f"{what} answered what a lancetag labeler does not ({first_problem(exc, 'the body')}): {response.text[:200]!r}; "
            "give --serve the URL `lancetag serve` printed (an OpenAI-compatible server labels through "
            "`lancetag serve --backend openai --base-url ...`)"
        ) from None


REPLICA_LOST_WAIT_S = 5.0  # a lost replica: wait this long before each new try (Serve replaces it meanwhile)


def _transient(exc: BaseException) -> bool:
    if isinstance(exc, LabelerUnavailable):
        return exc.reason != "labeler_unavailable"  # the timeout already waited long enough
    return isinstance(exc, httpx.TransportError)


def _no_answer(where: str, timeout_s: float, exc: BaseException) -> LabelerUnavailable:
    return LabelerUnavailable(
        f"{where} did not answer in {timeout_s:g} s ({type(exc).__name__}): no replica can run (its nodes lost?) "
        "or it is stuck; check `serve status`, then rerun the same command",
        reason="labeler_unavailable",
    )


def _wait(state: RetryCallState) -> float:
    """Wait what the server asked for (Retry-After), else back off exponentially."""
    exc = state.outcome.exception() if state.outcome else None
    if isinstance(exc, LabelerUnavailable) and exc.retry_after_s is not None:
        return min(exc.retry_after_s, 30.0)
    return wait_exponential(multiplier=0.2, max=10)(state)


class LabelerClient:
    """Sends batches of image bytes to a labeler and returns one LabelResult per image."""

    def __init__(
        self,
        *,
        url: str | None = None,
        handle: Any = None,
        token: str | None = None,
        timeout_s: float = 300.0,
        attempts: int = 5,
    ) -> None:
        if (url is None) == (handle is None):
            raise ValueError("give exactly one of url= (HTTP) or handle= (DeploymentHandle)")
        self.url = url.rstrip("/") if url else None
        self.handle = handle
        self.attempts = attempts
        self.timeout_s = timeout_s
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(timeout=timeout_s, headers=headers) if url else None

    @classmethod
    def over_http(cls, url: str, *, token: str | None = None, timeout_s: float = 300.0) -> LabelerClient:
        """Return a client for the labeler at ``url`` (its base URL, as ``run_labeler`` returns it)."""
        return cls(url=url, token=token, timeout_s=timeout_s)

    @classmethod
    def over_handle(cls, app_name: str = "lancetag-labeler", *, timeout_s: float = 300.0) -> LabelerClient:
        """Return a client that calls the Serve app ``app_name`` in this Ray cluster through its handle."""
        from ray import serve

        return cls(handle=serve.get_app_handle(app_name), timeout_s=timeout_s)

    def label(self, images: list[bytes]) -> list[LabelResult]:
        """Return one LabelResult per image, in order; raise LabelerUnavailable after the retries run out."""
        if not images:
            return []
        call = retry(
            retry=retry_if_exception(_transient),
            wait=_wait,
            stop=stop_after_attempt(self.attempts),
            reraise=True,
        )(self._label_http if self._http is not None else self._label_handle)
        return call(images)

    def _label_handle(self, images: list[bytes]) -> list[LabelResult]:
        from ray.exceptions import RayActorError
        from ray.serve.exceptions import BackPressureError

        response = self.handle.label.remote(images)
        try:
            records = response.result(timeout_s=self.timeout_s)
        except TimeoutError as exc:  # Serve holds a request while no replica runs: do not wait forever
            response.cancel()
            raise _no_answer("the labeler app", self.timeout_s, exc) from exc
        except BackPressureError as exc:
            raise LabelerUnavailable(str(exc), retry_after_s=1.0) from exc
        except RayActorError as exc:  # the replica died (its node lost): Serve starts another; ask again
            raise LabelerUnavailable(
                f"the labeler replica died ({type(exc).__name__})", retry_after_s=REPLICA_LOST_WAIT_S, reason="labeler_unreachable"
            ) from exc
        return [LabelResult.model_validate(r) for r in records]

    def _label_http(self, images: list[bytes]) -> list[LabelResult]:
        assert self._http is not None
        body = {"images": [base64.b64encode(b).decode() for b in images], "on_invalid": "record"}
        try:
            response = self._http.post(f"{self.url}/label", json=body)
        except (httpx.ReadTimeout, httpx.WriteTimeout, httpx.PoolTimeout) as exc:  # connected, never answered
            raise _no_answer(f"labeler at {self.url}", self.timeout_s, exc) from exc
        if response.status_code in (429, 502, 503, 504):
            retry_after = response.headers.get("retry-after")
            raise LabelerUnavailable(
                f"labeler at {self.url} answered {response.status_code}: {response.text[:200]}",
                retry_after_s=float(retry_after) if retry_after and retry_after.isdigit() else None,
            )
        if response.status_code >= 400:
            raise LabelerRequestError(
                f"labeler at {self.url} refused the request ({response.status_code}): {response.text[:500]}"
            )
        results = _read_reply(response, LabelReply, f"labeler at {self.url}").results
        if len(results) != len(images):
            raise NotALabeler(f"labeler at {self.url} answered {len(results)} results for {len(images)} images")
        return results

    def info(self) -> dict[str, Any]:
        """Return the labeler's /info (HTTP only)."""
        if self._http is None:
            raise LabelerRequestError("info() needs an HTTP client")
        try:
            response = self._http.get(f"{self.url}/info")
        except httpx.TransportError as exc:
            raise LabelerUnavailable(
                f"no labeler answers at {self.url} ({exc or type(exc).__name__}); start one with "
                "`lancetag serve --task T --model M`, or check the URL",
                reason="labeler_unreachable",
            ) from exc
        if response.status_code >= 400:
            raise LabelerRequestError(
                f"labeler at {self.url} refused /info ({response.status_code}: {response.text[:200]}); "
                "a 401 needs its token (--token-env)"
            )
        return _read_reply(response, LabelerInfo, f"labeler at {self.url}/info").model_dump()

    def close(self) -> None:
        """Close the HTTP connection pool."""
        if self._http is not None:
            self._http.close()
