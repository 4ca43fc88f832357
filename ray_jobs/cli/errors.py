"""The CLI's one error boundary: every failure ends as one line, one JSON object and one exit code.

An expected failure (a :class:`~lance_io.reasons.ReasonError`, or a foreign exception that
:func:`expected_error` recognises) prints ``error: <reason>: <message>`` on stderr and, with
``--json``, ``{"error": {"reason": ..., "message": ...}}`` as the only JSON on stdout. Anything else
is a bug: ``error: internal: <type>: <message>``. Tracebacks only with ``--debug`` or
``LANCETAG_DEBUG=1``. docs/cli.md is the user-facing description.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable

import typer
from typer._click.exceptions import NoArgsIsHelpError, UsageError  # typer >= 0.20 vendors click

from lance_io.reasons import ReasonError
from ray_jobs.cli.output import emit_json, json_stdout

EXIT_OK = 0
EXIT_PARTIAL = 1  # the job ran, but some of its work failed (label: fragments failed)
EXIT_EXPECTED = 2  # an expected error: bad input, missing table/version/column, unreachable service, ...
EXIT_INTERNAL = 3  # a bug: the traceback is one --debug away
EXIT_INTERRUPTED = 130

DEBUG_ENV = "LANCETAG_DEBUG"


def expected_error(exc: BaseException) -> ReasonError | None:
    """Return the ReasonError an expected failure stands for, or None for an unexpected one (a bug)."""
    if isinstance(exc, ReasonError):
        return exc
    if isinstance(exc, UsageError):
        where = f"`{exc.ctx.command_path} --help`" if exc.ctx else "`lancetag --help`"
        return ReasonError("bad_usage", f"{exc.format_message().rstrip('.')}; see {where}")
    for translate in _TRANSLATORS:
        found = translate(exc)
        if found is not None:
            return found
    return None


def _train_worker(exc: BaseException) -> ReasonError | None:
    """A ReasonError a Ray Train worker raised (a config its data cannot train with): Ray Train
    reports it inside a WorkerGroupError, by rank, wrapped with its traceback text."""
    failures = getattr(exc, "worker_failures", None)
    if not isinstance(failures, dict):
        return None
    for rank in sorted(failures):
        inner = getattr(failures[rank], "_base_exc", failures[rank])  # ray.train's UserExceptionWithTraceback
        if isinstance(inner, ReasonError):
            return inner
    return None


def _pydantic(exc: BaseException) -> ReasonError | None:
    from pydantic import ValidationError

    if not isinstance(exc, ValidationError):
        return None
    causes = [e.get("ctx", {}).get("error") for e in exc.errors()]
    if len(causes) == 1 and isinstance(causes[0], ReasonError):  # a validator that knows the reason
        return causes[0]
    problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'value'}: {e['msg']}" for e in exc.errors())
    return ReasonError("bad_option", f"{exc.title}: {problems}")


def _yaml(exc: BaseException) -> ReasonError | None:
    if "yaml" not in sys.modules or not isinstance(exc, sys.modules["yaml"].YAMLError):
        return None
    return ReasonError("bad_yaml", f"not valid YAML: {exc}; fix the file and rerun")


def _http(exc: BaseException) -> ReasonError | None:
    if "httpx" not in sys.modules:
        return None
    import httpx

    if isinstance(exc, httpx.TransportError):
        try:
            url = str(exc.request.url)
        except RuntimeError:  # httpx raises when the error carries no request
            url = "the service"
        return ReasonError(
            "service_unreachable", f"could not reach {url} ({exc or type(exc).__name__}); check the address and that it runs"
        )
    if isinstance(exc, httpx.HTTPStatusError):
        return ReasonError("service_refused", f"{exc.request.url} answered {exc.response.status_code}: {exc.response.text[:200]}")
    return None


def _os(exc: BaseException) -> ReasonError | None:
    if isinstance(exc, PermissionError):
        return ReasonError("permission_denied", f"{exc.filename or exc}: permission denied; check its owner and mode")
    if isinstance(exc, FileNotFoundError) and exc.filename:
        return ReasonError("file_not_found", f"{exc.filename}: no such file or folder")
    return None


def _lance(exc: BaseException) -> ReasonError | None:
    """Lance I/O and SQL errors that reach the boundary without a library function translating them."""
    if not isinstance(exc, ValueError | OSError) or "lance" not in sys.modules:
        return None
    from lance_io.scan import lance_detail, lance_reason

    reason = lance_reason(exc)
    if reason is None or reason == "table_not_found":  # "not found" alone is too vague to be sure
        return None
    return ReasonError(reason, f"{lance_detail(exc)}; {_LANCE_HINTS[reason]}")


# What to do, for the reasons lance_reason() finds in an error no library function translated.
_LANCE_HINTS = {
    "permission_denied": "check the permissions of the table's folder, or the bucket's credentials and policy",
    "storage_full": "free space (or move the table) and rerun",
    "storage_unreachable": "check the endpoint ($LANCETAG_STORAGE_OPTIONS) and that the object store is up, then rerun",
    "bad_where": "fix the SQL predicate (columns: `lancetag show TABLE`)",
    "version_not_found": "list the versions and tags with `lancetag versions TABLE`",
}


def _model(exc: BaseException) -> ReasonError | None:
    from serve_apps.backends.base import HUB_MISSES, MODEL_HINT

    chain = []
    while exc is not None and len(chain) < 10:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    miss = next((e for e in chain if type(e).__name__ in HUB_MISSES), None)
    if miss is None:
        return None
    return ReasonError("model_not_found", f"could not load the model ({type(miss).__name__}: {miss}); {MODEL_HINT}")


# Where LLaMA-Factory and transformers check training arguments: a failure raised there is the config's.
_ARGUMENT_CHECKS = ("llamafactory/hparams/", "transformers/training_args.py", "transformers/hf_argparser.py")


def _training_args(exc: BaseException) -> ReasonError | None:
    if not isinstance(exc, ValueError | TypeError | AssertionError):
        return None
    frames = traceback.extract_tb(exc.__traceback__)
    if not any(check in frame.filename.replace(os.sep, "/") for frame in frames for check in _ARGUMENT_CHECKS):
        return None
    return ReasonError("bad_training_config", f"LLaMA-Factory refuses the training config: {exc or type(exc).__name__}")


_TRANSLATORS: tuple[Callable[[BaseException], ReasonError | None], ...] = (
    _train_worker, _pydantic, _yaml, _http, _model, _training_args, _os, _lance
)


def one_line(text: str) -> str:
    """Return ``text`` on one line: every run of whitespace (newlines too) becomes one space."""
    return " ".join(str(text).split())


def report(reason: str, message: str, *, as_json: bool) -> None:
    """Print a failure the one way: ``error: reason: message`` on stderr, and the JSON error with --json."""
    message = one_line(message)
    sys.stdout.flush()
    print(f"error: {reason}: {message}", file=sys.stderr, flush=True)
    if as_json:
        emit_json({"error": {"reason": reason, "message": message}})


def run_app(app: Callable[..., object], args: list[str]) -> int:
    """Run the typer ``app`` on ``args`` inside the boundary; return the process exit code.

    ``--json`` and ``--debug`` are looked for before a ``--`` (what follows belongs to a
    submitted command); ``--debug`` may stand anywhere there and is handed to the app up front.
    """
    own = args[: args.index("--")] if "--" in args else args
    as_json = "--json" in own
    debug = "--debug" in own or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    if "--debug" in own:
        args = ["--debug", *[a for a in own if a != "--debug"], *args[len(own) :]]
    with json_stdout(as_json):
        return _run(app, args, as_json=as_json, debug=debug)


def _run(app: Callable[..., object], args: list[str], *, as_json: bool, debug: bool) -> int:
    try:
        code = app(args=args, prog_name="lancetag", standalone_mode=False)
    except NoArgsIsHelpError as exc:  # `lancetag` alone: help, not an error
        exc.show()
        return EXIT_OK
    except typer.Abort:
        report("interrupted", "stopped by the user", as_json=as_json)
        return EXIT_INTERRUPTED
    except Exception as exc:  # the boundary: whatever escaped a command ends here, once
        if debug:
            traceback.print_exc()
        err = expected_error(exc)
        if err is not None:
            report(err.reason, err.message, as_json=as_json)
            return EXIT_EXPECTED
        hint = "" if debug else " (run with --debug for the traceback)"
        report("internal", f"{type(exc).__name__}: {one_line(str(exc))[:500]}{hint}", as_json=as_json)
        return EXIT_INTERNAL
    if code == EXIT_INTERRUPTED:  # typer turns Ctrl-C into Exit(130)
        report("interrupted", "stopped by the user", as_json=as_json)
    return code if isinstance(code, int) else EXIT_OK
