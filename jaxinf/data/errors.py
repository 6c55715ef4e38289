"""The one exception the data layer raises for bad input."""

from __future__ import annotations

from jaxinf.errors import UserError


class DataError(UserError):
    """Bad input data or settings.

    The message is always a single line that names where the problem is: a file
    and line (``docs.jsonl:17: invalid JSON (...)``), a file and field
    (``release_7B.json: field "prompts" ...``) or a setting
    (``data.max_length: ...``). The command line prints it as it is, without a
    traceback.
    """


def where(path: str, line: int | None = None) -> str:
    """``path:line`` (or ``path``), the prefix of every message about a file."""
    return f"{path}:{line}" if line is not None else str(path)


def type_name(value: object) -> str:
    """The JSON name of a decoded value's type (``null``, ``bool``, ``int``, ``float``, ``str``, ``list``, ``object``)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def where_row(path: str, row: int) -> str:
    """``path: row N``, the prefix of a message about a row of a Parquet or Arrow file (rows from 1)."""
    return f"{path}: row {row}"


def one_line(e: BaseException) -> str:
    """A library's exception as at most 300 characters of one line (its type's name when it says nothing)."""
    text = " ".join(str(e).split())
    return text[:300] if text else type(e).__name__
