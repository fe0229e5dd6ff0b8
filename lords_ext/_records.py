"""The JSON record beside saved tensors (quantized models, adapters): read and check its format."""
from __future__ import annotations

import json
from pathlib import Path


def read_record(directory, filename: str, fmt: str, version, error: type[Exception], writer: str) -> tuple[Path, dict]:
    """(path, record) of `directory/filename`, or `error` naming what is wrong: absent, not JSON,
    another format, another version."""
    d = Path(directory)
    p = d / filename
    if not p.is_file():
        raise error(f"{d}: no {filename}; this is not a directory written by {writer}")
    try:
        meta = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise error(f"{p}: not valid JSON ({e})") from e
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise error(f"{p}: format: expected {fmt!r}, got {got!r}")
    if meta.get("format_version") != version:
        raise error(f"{p}: format_version: this lords_ext reads version {version}, the file has "
                    f"{meta.get('format_version')!r}; save it again with a matching lords_ext")
    return p, meta
