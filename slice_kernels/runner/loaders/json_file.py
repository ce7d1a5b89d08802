"""Reading a whole-file JSON task (SuperNI, TRACE) with errors that name the file, the record and its line.

``json.load`` reports where the text stops being JSON, but a well-formed file with a bad record (a missing key, an
empty output list) only has an index. The line of that record is found by walking the document with
``raw_decode``, only on the error path, so a valid file is parsed once by the C decoder.
"""

from __future__ import annotations

import json
import os

from ..errors import TaskError

_DECODER = json.JSONDecoder()
_WS = " \t\n\r"


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in _WS:
        i += 1
    return i


def _load(path: str) -> tuple[object, str]:
    # check_spec and load_task each parse the file: json.loads of a 20 MB document took 0.05 s here, and keeping
    # parsed documents between the two would hold several times the files' size in memory for the whole run
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise TaskError(
            f"{path}, line {line}: not UTF-8 (byte {raw[e.start]:#04x} at offset {e.start}); save the file as UTF-8"
        ) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise TaskError(
            f"{path}, line {e.lineno}, column {e.colno}: not valid JSON ({e.msg}); the file must be one JSON document"
        ) from None
    return data, text


def load_json(path: str, what: str) -> tuple[object, str]:
    """The parsed document and its text; ``what`` says in the error what the file should be."""
    if not os.path.isfile(path):
        raise TaskError(f"{what} {path!r} does not exist or is not a file")
    try:
        return _load(path)
    except OSError as e:
        raise TaskError(f"{what} {path!r} cannot be read ({e.strerror})") from None


def element_line(text: str, index: int, key: str | None = None) -> int | None:
    """Line (1-based) where element ``index`` of the array starts: the top-level array, or the array under
    top-level object key ``key``. None when the document does not have that shape (the caller then names the
    index only)."""
    try:
        i = _skip_ws(text, 0)
        if key is not None:
            if text[i] != "{":
                return None
            i = _skip_ws(text, i + 1)
            while text[i] != "}":
                k, i = _DECODER.raw_decode(text, i)
                i = _skip_ws(text, i)
                i = _skip_ws(text, i + 1)  # the ':'
                if k == key:
                    break
                _, i = _DECODER.raw_decode(text, i)
                i = _skip_ws(text, i)
                if text[i] == ",":
                    i = _skip_ws(text, i + 1)
            else:
                return None
        if text[i] != "[":
            return None
        i = _skip_ws(text, i + 1)
        for n in range(index + 1):
            if text[i] == "]":
                return None
            if n == index:
                return text.count("\n", 0, i) + 1
            _, i = _DECODER.raw_decode(text, i)
            i = _skip_ws(text, i)
            if text[i] == ",":
                i = _skip_ws(text, i + 1)
    except (IndexError, json.JSONDecodeError):
        return None
    return None


def where(path: str, text: str, index: int, key: str | None = None, label: str = "record") -> str:
    """``path, <label> <index> (line N)`` for an error message."""
    line = element_line(text, index, key)
    return f"{path}, {label} {index}" + (f" (line {line})" if line is not None else "")
