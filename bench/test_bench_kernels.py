"""pytest-benchmark suite: the comparisons of bench_kernels.py, for users who live in pytest.

    pytest bench/ --benchmark-only                       # 4096x4096, M in 1, 16, 256, 4096
    LORDS_BENCH_FULL=1 pytest bench/ --benchmark-only    # every shape and M of BENCHMARKING.md
    LORDS_BENCH_MS=1,8 pytest bench/ --benchmark-only    # choose the token counts

Each test checks one method against its fp32 reference on fresh random input (and fails if the
result is wrong), captures a CUDA graph of a loop over weight copies rotated past L2, and hands
one replay + synchronize to pytest-benchmark as a round. pytest-benchmark's own columns are
therefore per round (`calls_per_round` calls plus one host sync); the per-call GPU time from CUDA
events, the figure that compares with BENCHMARKING.md, is in extra_info["us_per_call"] and in the
ratio table printed at the end of the session (bench/conftest.py).

Without a CUDA GPU the whole module skips; without bitsandbytes (or gemlite, or a LoRDS backend)
only those methods skip, with the reason.
"""
from __future__ import annotations

import functools
import os

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("kernel benchmarks need a CUDA GPU (none visible)", allow_module_level=True)
pytest.importorskip("pytest_benchmark", reason="pytest-benchmark is not installed (pip install pytest-benchmark)")

from bench import bench_kernels, methods, timing  # noqa: E402  (after the skips above)

FULL = os.environ.get("LORDS_BENCH_FULL", "") == "1"
SHAPES = bench_kernels.SHAPES if FULL else ((4096, 4096),)
MS = bench_kernels.MS if FULL else (1, 16, 256, 4096)
if os.environ.get("LORDS_BENCH_MS"):
    MS = tuple(int(m) for m in os.environ["LORDS_BENCH_MS"].split(","))
KEYS = [k for k in methods.default_keys() if k != "floor"]
ROUND_SECONDS = 0.1  # target wall time of the rounds of one test

_built: dict[tuple[int, int, str], object] = {}
_lords_weights: dict[tuple[int, int], methods.LordsWeights] = {}


def _contender(shape: tuple[int, int], key: str):
    """Build once per (shape, method) for the whole session; Unavailable is cached as its message."""
    N, K = shape
    if (N, K, key) not in _built:
        device = torch.device("cuda")

        def lords_weights():
            if (N, K) not in _lords_weights:
                _lords_weights[(N, K)] = methods.LordsWeights(N, K, device)
            return _lords_weights[(N, K)]

        try:
            _built[(N, K, key)] = methods.build(key, N, K, device, lords_weights)
        except methods.Unavailable as exc:
            _built[(N, K, key)] = str(exc)
    got = _built[(N, K, key)]
    if isinstance(got, str):
        pytest.skip(f"{key}: {got}")
    return got


def _replay_and_sync(loop: timing.Loop) -> None:
    loop.replay()
    torch.cuda.synchronize()


def _run(benchmark, loop: timing.Loop, t: timing.Timing, group: str, extra: dict) -> None:
    benchmark.group = group
    benchmark.extra_info.update(extra)
    benchmark.extra_info.update(us_per_call=round(t.us, 3), p10_us=round(t.p10_us, 3), p90_us=round(t.p90_us, 3),
                                calls_per_round=t.calls_per_replay, cuda_graph=t.graph)
    round_s = max(t.us * t.calls_per_replay * 1e-6, 1e-6)
    rounds = int(min(200, max(5, ROUND_SECONDS / round_s)))
    benchmark.pedantic(_replay_and_sync, args=(loop,), rounds=rounds, warmup_rounds=1, iterations=1)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("M", MS, ids=lambda m: f"M{m}")
@pytest.mark.parametrize("key", KEYS)
def test_dequant_matmul(benchmark, bench_record, shape, M, key):
    c = _contender(shape, key)
    N, K = shape
    gen = torch.Generator(device="cuda").manual_seed(M * 7919 + N + K)
    x = torch.randn(M, K, device="cuda", generator=gen).to(methods.DTYPE)
    reason = c.supports(x)
    if reason:
        pytest.skip(reason)
    with torch.no_grad():
        err = methods.check(c, x)
        assert err <= c.tol, f"{c.label} at {N}x{K}, M={M}: rel err {err:.3e} exceeds {c.tol:.0e} against fp32"
        loop = timing.Loop([functools.partial(c.call, st, x) for st in c.copies])
        try:
            t = loop.time()
            _run(benchmark, loop, t, f"{N}x{K} M={M}",
                 {"method": c.label, "rel_err": err, "weight_copies": len(c.copies),
                  "bytes_per_copy": c.bytes_per_copy, "note": c.note})
        finally:
            loop.close()
        err_after = methods.check(c, x)
        assert err_after <= c.tol, (f"{c.label} at {N}x{K}, M={M}: rel err {err_after:.3e} after the timed replays "
                                    f"(before: {err:.3e}): the result is not deterministic")
    bench_record.append(bench_kernels.record(shape, M, c, "ok", rel_err=max(err, err_after), **t.as_dict()))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_read_floor(benchmark, bench_floors, shape):
    """The streaming-read floor of a LoRDS layer's bytes (the fastest of the read-kernel variants)."""
    N, K = shape
    variants = methods.floor_variants(N, K, torch.device("cuda"))
    best = None
    for c in variants:
        out = c.call(c.copies[0], None)
        torch.cuda.synchronize()
        assert c.extra.get("check", lambda o: True)(out), f"read kernel ({c.note}) returned a wrong sum"
        loop = timing.Loop([functools.partial(c.call, st, None) for st in c.copies])
        t = loop.time()
        if best is None or t.us < best[1].us:
            if best is not None:
                best[0].close()
            best = (loop, t, c)
        else:
            loop.close()
    loop, t, c = best
    try:
        _run(benchmark, loop, t, f"{N}x{K} floor", {"method": "read floor", "bytes": c.bytes_per_copy,
                                                     "tb_per_s": c.bytes_per_copy / t.us / 1e6, "variant": c.note})
    finally:
        loop.close()
    bench_floors[f"{N}x{K}"] = {"us": t.us, "bytes": c.bytes_per_copy, "tb_per_s": c.bytes_per_copy / t.us / 1e6,
                                "variant": c.note}
