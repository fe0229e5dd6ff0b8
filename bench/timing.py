"""GPU timing by CUDA-graph replay, with weights rotated past L2 (the method of BENCHMARKING.md).

Why graphs: at small M a call takes 5-20 us on the GPU, less than Python needs to launch it, so
eager timing measures the interpreter. A graph holding a loop of calls is launched once per replay.
Why rotation: the H100's 50 MB L2 holds a whole 4096x4096 4-bit layer; timing one weight copy over
and over measures L2, not HBM. The graph walks through enough distinct copies (>= 240 MB, and at
least four times the L2) that every call reads its weights from device memory.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import torch

MIN_ROTATION_BYTES = 240_000_000
MAX_COPIES = 512


def l2_bytes() -> int:
    if not torch.cuda.is_available():
        return 0
    return int(getattr(torch.cuda.get_device_properties(torch.cuda.current_device()), "L2_cache_size", 0))


def rotation_bytes() -> int:
    """Total distinct weight bytes one graph replay must walk through."""
    return max(MIN_ROTATION_BYTES, 4 * l2_bytes())


def copies_for(bytes_per_copy: int) -> int:
    """Distinct weight copies needed so that a replay reads >= rotation_bytes() (at least 2)."""
    if bytes_per_copy <= 0:
        raise ValueError(f"bytes_per_copy: expected a positive byte count, got {bytes_per_copy}")
    return max(2, min(MAX_COPIES, math.ceil(rotation_bytes() / bytes_per_copy)))


@dataclass
class Timing:
    us: float  # median microseconds per call
    p10_us: float  # 10th and 90th percentile per call, to show the spread
    p90_us: float
    calls_per_replay: int
    replays: int
    graph: bool  # False: the callable could not be captured and was timed eagerly (flagged in reports)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def rel_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    """||y - ref|| / ||ref|| in float64; inf when y holds NaN/inf or has the wrong shape."""
    if tuple(y.shape) != tuple(ref.shape):
        return math.inf
    y64, r64 = y.detach().double(), ref.detach().double()
    if not bool(torch.isfinite(y64).all()):
        return math.inf
    den = float(r64.norm())
    return float((y64 - r64).norm()) / max(den, 1e-30)


def _percentile(sorted_vals: Sequence[float], q: float) -> float:
    idx = min(len(sorted_vals) - 1, max(0, round(q * (len(sorted_vals) - 1))))
    return sorted_vals[idx]


def _sequence(calls: Sequence[Callable[[], Any]], min_calls: int) -> list[Callable[[], Any]]:
    if not calls:
        raise ValueError("calls: expected at least one callable, got an empty sequence")
    reps = max(1, math.ceil(min_calls / len(calls)))
    return list(calls) * reps


def _time_replays(launch: Callable[[], None], calls_per_replay: int, target_s: float,
                  min_replays: int, max_replays: int, graph: bool, cuda: bool = True) -> Timing:
    if cuda:
        # One probe replay sizes the run: small layers get many replays, 100 ms replays only a few.
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        launch()
        end.record()
        end.synchronize()
        probe_ms = max(start.elapsed_time(end), 1e-3)
        replays = int(min(max_replays, max(min_replays, target_s * 1e3 / probe_ms)))
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(replays)]
        for s, e in events:
            s.record()
            launch()
            e.record()
        torch.cuda.synchronize()
        elapsed_ms = [s.elapsed_time(e) for s, e in events]
    else:
        t0 = time.perf_counter()
        launch()
        probe_ms = max((time.perf_counter() - t0) * 1e3, 1e-3)
        replays = int(min(max_replays, max(min_replays, target_s * 1e3 / probe_ms)))
        elapsed_ms = []
        for _ in range(replays):
            t0 = time.perf_counter()
            launch()
            elapsed_ms.append((time.perf_counter() - t0) * 1e3)
    per_call = sorted(ms * 1e3 / calls_per_replay for ms in elapsed_ms)
    return Timing(us=statistics.median(per_call), p10_us=_percentile(per_call, 0.1),
                  p90_us=_percentile(per_call, 0.9), calls_per_replay=calls_per_replay,
                  replays=replays, graph=graph)


class Loop:
    """A loop over `calls` (one zero-argument callable per weight copy, in rotation order), repeated
    until it holds >= `min_calls` calls and captured once in a CUDA graph; `replay()` launches it.

    If capture fails (a library that syncs with the host, say) and `allow_eager`, `replay()` runs the
    loop from Python and `graph` is False, so every report can flag the number. A non-CUDA `device`
    runs the loop on the host (graph False): for smoke tests of the harness only.
    """

    def __init__(self, calls: Sequence[Callable[[], Any]], *, min_calls: int = 8, warmup: int = 2,
                 allow_eager: bool = True, log: Callable[[str], None] = print,
                 device: torch.device | str | None = None):
        self.seq = _sequence(calls, min_calls)
        self.calls_per_replay = len(self.seq)
        self.cuda = device is None or torch.device(device).type == "cuda"
        self.graph = False
        self._graph = None
        if not self.cuda:
            for _ in range(warmup):
                self._eager()
            return
        # Warm up on a side stream before capture, as torch.cuda.graphs asks: lazy initialization
        # (cuBLAS handles, Triton compilation and autotuning, workspaces) must not be captured.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                self._eager()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self._eager()
        except Exception as exc:  # noqa: BLE001 - any capture failure falls back or re-raises
            del graph
            torch.cuda.synchronize()
            if not allow_eager:
                raise
            log(f"    note: CUDA-graph capture failed ({type(exc).__name__}: {str(exc).splitlines()[0][:120]}); "
                "timing eagerly from Python (launch overhead included)")
            for _ in range(warmup):
                self._eager()
            return
        self._graph, self.graph = graph, True
        for _ in range(warmup):
            graph.replay()
        torch.cuda.synchronize()

    def _eager(self) -> None:
        for f in self.seq:
            f()

    def replay(self) -> None:
        if self._graph is not None:
            self._graph.replay()
        else:
            self._eager()

    def time(self, *, target_s: float = 0.15, min_replays: int = 5, max_replays: int = 200) -> Timing:
        """Median time of one call over replays of the loop, each bracketed by CUDA events."""
        return _time_replays(self.replay, self.calls_per_replay, target_s, min_replays, max_replays,
                             graph=self.graph, cuda=self.cuda)

    def close(self) -> None:
        """Release the graph and its private memory pool."""
        self._graph = None
        self.seq = []


def time_calls(calls: Sequence[Callable[[], Any]], *, min_calls: int = 8, target_s: float = 0.15,
               min_replays: int = 5, max_replays: int = 200, warmup: int = 2,
               allow_eager: bool = True, log: Callable[[str], None] = print,
               device: torch.device | str | None = None) -> Timing:
    """Median GPU time of one call, from CUDA-graph replays of a loop over `calls` (see Loop)."""
    loop = Loop(calls, min_calls=min_calls, warmup=warmup, allow_eager=allow_eager, log=log, device=device)
    try:
        return loop.time(target_s=target_s, min_replays=min_replays, max_replays=max_replays)
    finally:
        loop.close()
