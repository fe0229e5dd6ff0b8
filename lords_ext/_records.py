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


def read_tensors(path: Path, version, error: type[Exception], what: str = "tensors",
                 expected_bytes: int | None = None) -> dict:
    """All tensors of a safetensors file on the CPU, or `error` naming what is wrong: absent,
    truncated (size differs from `expected_bytes` where the record gives it), another version in
    its header, damaged."""
    from safetensors import safe_open

    if not path.is_file():
        raise error(f"{path}: {what} file missing")
    if expected_bytes is not None and path.stat().st_size != expected_bytes:
        raise error(f"{path}: expected {expected_bytes} bytes (as recorded beside it), found "
                    f"{path.stat().st_size}: the file is truncated or was replaced")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            header = f.metadata() or {}
            if header.get("format_version") != str(version):
                raise error(f"{path}: format_version: expected {version}, the file header says "
                            f"{header.get('format_version')!r}")
            return {k: f.get_tensor(k) for k in f.keys()}
    except error:
        raise
    except Exception as e:  # safetensors raises its own error type for damaged headers and data
        raise error(f"{path}: cannot read the {what} ({type(e).__name__}: {e}); the file is damaged") from e
