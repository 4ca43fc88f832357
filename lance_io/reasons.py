"""The one error type users act on: a stable reason code and a message saying what to do.

Every package raises :class:`ReasonError` (or a subclass) for an expected failure; the CLI
prints it as ``error: <reason>: <message>`` and ``--json`` as
``{"error": {"reason": ..., "message": ...}}``. This module imports nothing, so the vLLM
labeling environment (no Lance, no pyarrow) can use it too.

Example::

    raise ReasonError("column_missing", "/data/t.lance has no column 'label'; label it first")
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydantic import ValidationError


class ReasonError(ValueError):
    """An expected failure: ``reason`` is a stable snake_case code, ``message`` what happened and what to do."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message

    def as_dict(self) -> dict[str, str]:
        """Return ``{"reason": ..., "message": ...}`` (the CLI's JSON error shape)."""
        return {"reason": self.reason, "message": self.message}

    def __reduce__(self) -> tuple:
        # Subclasses take other constructor arguments; rebuilding from the fields lets every one
        # cross a process boundary (a Ray task's error reaches the driver pickled).
        return (_rebuild, (type(self), self.args, self.__dict__))


def first_problem(exc: ValidationError, whole: str = "the value") -> str:
    """Return a pydantic error's first problem as ``field.path: message`` (``whole`` for the value itself)."""
    first = exc.errors()[0]
    return f"{'.'.join(map(str, first['loc'])) or whole}: {first['msg']}"


def _rebuild(cls: type[ReasonError], args: tuple, state: dict) -> ReasonError:
    # The built-in exception whose layout ``cls`` has (OSError for TableWriteError) must allocate it.
    solid = max((b for b in cls.__mro__ if b.__module__ == "builtins"), key=lambda b: b.__basicsize__)
    err = solid.__new__(cls, *args)
    BaseException.__init__(err, *args)
    err.__dict__.update(state)
    return err
