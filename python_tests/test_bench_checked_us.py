"""bench.decode_paths.checked_us: a wrong result is refused before anything is timed."""
import pytest
import torch

from bench.decode_paths import checked_us, parse_shape


def test_wrong_result_is_refused_before_timing(monkeypatch):
    from bench import timing

    timed = []
    monkeypatch.setattr(timing, "time_calls", lambda *a, **k: timed.append(a))
    ref = torch.randn(8, 8)
    copies = [(ref,), (ref.clone(),)]
    with pytest.raises(AssertionError, match=r"path 0 at N=8: rel err 1"):
        checked_us(lambda w: w * 2.0, copies, ref, 2e-2, "path 0 at N=8")
    assert timed == []


def test_parse_shape_reads_an_optional_rank():
    assert parse_shape("4096x14336") == (4096, 14336, None)
    assert parse_shape("1024x4096r49") == (1024, 4096, 49)
    with pytest.raises(ValueError, match="shape: expected NxK or NxKrR"):
        parse_shape("1024x4096x2")
