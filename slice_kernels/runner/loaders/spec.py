"""The benchmark spec form shared by the loaders: ``<prefix><path>[?key=value&key=value]``."""

from __future__ import annotations

from ..errors import TaskError

PREFIXES = ("superni:", "trace:")


def kind(spec: str) -> str | None:
    """``"superni"`` or ``"trace"`` for a benchmark spec, else None (reasoning-gym names and JSONL files)."""
    for p in PREFIXES:
        if spec.startswith(p):
            return p[:-1]
    return None


def parse_spec(spec: str, allowed: dict) -> tuple[str, dict]:
    """``<prefix><path>[?k=v&k=v]`` -> (path, options); ``allowed`` maps each option to its accepted values
    (a tuple) or to ``int`` (a non-negative integer)."""
    body = spec.split(":", 1)[1]
    path, _, query = body.partition("?")
    if not path:
        raise TaskError(f"task {spec!r}: no path after {spec.split(':', 1)[0]}: (e.g. {kind(spec)}:/data/...)")
    opts: dict = {}
    for part in filter(None, query.split("&")):
        k, eq, v = part.partition("=")
        if not eq or not k:
            raise TaskError(f"task {spec!r}: option {part!r} must look like key=value (path?key=value&key=value)")
        if k not in allowed:
            raise TaskError(f"task {spec!r}: unknown option {k!r}; {kind(spec)} tasks accept {sorted(allowed)}")
        ok = allowed[k]
        if ok is int:
            if not v.isdigit():
                raise TaskError(f"task {spec!r}: option {k}={v!r} must be a non-negative integer")
            opts[k] = int(v)
        else:
            if v not in ok:
                raise TaskError(f"task {spec!r}: option {k}={v!r} must be one of {', '.join(ok)}")
            opts[k] = v
    return path, opts
