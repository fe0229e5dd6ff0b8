"""Kernel benchmark: LoRDS dequant-matmul against bitsandbytes NF4, QLoRA, cuBLAS bf16, torch int4,
gemlite and the streaming-read floor, on the Llama-3-8B linear shapes (BENCHMARKING.md).

    python -m bench.bench_kernels                  # every shape and M, every available method
    python -m bench.bench_kernels --quick          # the anchor shapes and Ms of BENCHMARKING.md
    python bench/bench_kernels.py --shapes 4096x4096 --ms 1,16,256 --methods cublas,bnb_nf4,lords_op

Each method is checked against an fp32 reference on fresh random input before it is timed; a wrong
result is reported as ERR and not timed. Times are CUDA-graph replays with weights rotated past L2
(timing.py). Prints a table of microseconds and ratios last, writes JSON (--out) and one
latency-vs-M PNG per shape (skipped, with a message, where matplotlib is absent).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import functools
import json
import math
import os
import re
import sys
import time
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench` and `lords_ext` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = "bench"

import torch

from bench import methods, timing

SHAPES = ((4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336))
MS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096, 8192)
QUICK_SHAPES = ((4096, 4096), (14336, 4096))
QUICK_MS = (1, 2, 4, 8, 16, 64, 256, 1024, 4096)
# Families whose best time per M is "the best existing kernel" LoRDS has to beat.
EXISTING = "existing"


def parse_shape(text: str) -> tuple[int, int]:
    try:
        n, k = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape: expected NxK like 4096x4096, got {text!r}") from None
    if n <= 0 or k <= 0:
        raise argparse.ArgumentTypeError(f"shape: expected positive N and K, got {text!r}")
    return n, k


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default=None, help="comma-separated NxK (out x in features); default: Llama-3-8B set")
    p.add_argument("--ms", default=None, help="comma-separated token counts M")
    p.add_argument("--methods", default=None,
                   help=f"comma-separated keys from {methods.all_keys()}; default: all but {list(methods.DEFAULT_EXTRA_OFF)}")
    p.add_argument("--quick", action="store_true",
                   help=f"shapes {[f'{n}x{k}' for n, k in QUICK_SHAPES]} and M in {list(QUICK_MS)}")
    p.add_argument("--out", default=os.path.join("bench", "results", "bench_kernels.json"), help="JSON output path")
    p.add_argument("--plot-dir", default=None, help="where PNGs go (default: the folder of --out); 'none' skips")
    p.add_argument("--target-s", type=float, default=0.15, help="seconds of replays per measurement (min 5 replays)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="stop timing new cases after this many seconds (the rest is reported as skipped)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--from-log", default=None, metavar="LOG",
                   help="rebuild JSON, plots and table from the progress log of a run that was cut off")
    p.add_argument("--device", default="cuda",
                   help="cuda (the benchmark); cpu only smoke-tests this harness (host clock, no graphs)")
    p.add_argument("--rotation-mb", type=float, default=timing.MIN_ROTATION_BYTES / 1e6,
                   help="distinct weight MB per replay (the method needs >= 240; lower only for smoke tests)")
    args = p.parse_args(argv)
    try:
        args.shape_list = [parse_shape(s) for s in args.shapes.split(",")] if args.shapes else \
            list(QUICK_SHAPES if args.quick else SHAPES)
    except argparse.ArgumentTypeError as exc:
        p.error(f"--shapes: {exc}")
    try:
        args.m_list = [int(m) for m in args.ms.split(",")] if args.ms else list(QUICK_MS if args.quick else MS)
    except ValueError:
        p.error(f"--ms: expected comma-separated integers, got {args.ms!r}")
    if any(m <= 0 for m in args.m_list):
        p.error(f"--ms: expected positive token counts, got {args.m_list}")
    known = methods.all_keys()
    args.keys = [k.strip() for k in args.methods.split(",")] if args.methods else methods.default_keys()
    bad = [k for k in args.keys if k not in known]
    if bad:
        p.error(f"--methods: expected keys from {known}, got unknown {bad}")
    return args


def environment(device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {"gpu": "cpu (harness smoke test, not a benchmark)"}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        env = {"gpu": props.name, "sms": props.multi_processor_count, "l2_bytes": timing.l2_bytes(),
               "memory_bytes": props.total_memory, "capability": f"{props.major}.{props.minor}"}
    env.update({
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "rotation_bytes": timing.rotation_bytes(), "python": sys.version.split()[0],
        "utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
    })
    for mod in ("triton", "bitsandbytes", "gemlite"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception as exc:  # noqa: BLE001 - recorded as absent
            env[mod] = f"absent ({type(exc).__name__})"
    try:
        import lords_ext
        env["lords_backends"] = {n: lords_ext.backends.available(n) for n in lords_ext.backends.names()}
    except Exception as exc:  # noqa: BLE001
        env["lords_backends"] = f"lords_ext does not import ({type(exc).__name__}: {exc})"
    return env


def record(shape, M, c, status, **kw) -> dict[str, Any]:
    rec = {"shape": f"{shape[0]}x{shape[1]}", "N": shape[0], "K": shape[1], "M": M, "key": c.key,
           "label": c.label, "family": c.family, "status": status, "bytes_per_copy": c.bytes_per_copy,
           "copies": len(c.copies), "note": c.note}
    rec.update(kw)
    return rec


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure_floor(shape, variants, target_s, device) -> dict[str, Any] | None:
    best = None
    for c in variants:
        out = c.call(c.copies[0], None)
        _sync(device)
        if not c.extra.get("check", lambda o: True)(out):
            print(f"  floor {c.note}: WRONG sum, not used")
            continue
        t = timing.time_calls([functools.partial(c.call, st, None) for st in c.copies], target_s=target_s,
                              device=device)
        print(f"  floor {c.note}: {t.us:.2f} us ({c.bytes_per_copy / t.us / 1e6:.2f} TB/s)")
        if best is None or t.us < best["us"]:
            best = {"us": t.us, "p10_us": t.p10_us, "p90_us": t.p90_us, "bytes": c.bytes_per_copy,
                    "tb_per_s": c.bytes_per_copy / t.us / 1e6, "variant": c.note, "copies": len(c.copies),
                    "graph": t.graph}
    return best


def run_case(shape, M, c, x, target_s, device) -> dict[str, Any]:
    reason = c.supports(x)
    if reason:
        print(f"  {c.label:<24s} M={M:<5d} skip: {reason}")
        return record(shape, M, c, "skipped", reason=reason)
    try:
        err = methods.check(c, x)
        info = c.info(x)
        if not err <= c.tol:
            print(f"  {c.label:<24s} M={M:<5d} WRONG: rel err {err:.3e} > {c.tol:.0e}; not timed")
            return record(shape, M, c, "wrong", rel_err=err, info=info)
        t = timing.time_calls([functools.partial(c.call, st, x) for st in c.copies], target_s=target_s,
                              device=device)
        # Checked again after the replays: an error that moves between runs is a race, and a graph
        # replay must leave a correct kernel correct.
        err_after = methods.check(c, x)
        if not err_after <= c.tol:
            print(f"  {c.label:<24s} M={M:<5d} WRONG after timing: rel err {err_after:.3e} (before: {err:.3e}); "
                  "nondeterministic result")
            return record(shape, M, c, "wrong", rel_err=err_after, rel_err_before=err, info=info, **t.as_dict())
    except torch.cuda.OutOfMemoryError as exc:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(f"  {c.label:<24s} M={M:<5d} out of memory: {str(exc).splitlines()[0][:120]}")
        return record(shape, M, c, "error", reason=f"OOM: {str(exc).splitlines()[0][:200]}")
    except Exception as exc:  # noqa: BLE001 - one broken method must not stop the run
        try:
            _sync(device)
        except Exception as sync_exc:  # noqa: BLE001 - a sticky CUDA error ends the run
            raise RuntimeError(f"CUDA context unusable after {c.label} failed: {sync_exc}") from exc
        msg = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        print(f"  {c.label:<24s} M={M:<5d} error: {msg}")
        return record(shape, M, c, "error", reason=msg)
    gbps = c.bytes_per_copy / t.us / 1e3
    flag = "" if t.graph else "  (eager: graph capture failed)"
    print(f"  {c.label:<24s} M={M:<5d} {t.us:9.2f} us  [p10 {t.p10_us:.2f}, p90 {t.p90_us:.2f}]  "
          f"err {err:.1e}  {gbps:6.0f} GB/s weights{(' ' + info) if info else ''}{flag}")
    return record(shape, M, c, "ok", rel_err=max(err, err_after), info=info, weight_gb_per_s=gbps, **t.as_dict())


def run(args, checkpoint=None) -> dict[str, Any]:
    """Time every (shape, M, method). `checkpoint(partial_report)` is called after each shape, so a
    run stopped from outside still leaves its finished shapes on disk."""
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 references must be fp32
    torch.backends.cudnn.allow_tf32 = False
    t_start = time.monotonic()
    results: list[dict[str, Any]] = []
    floors: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    for shape in args.shape_list:
        N, K = shape
        name = f"{N}x{K}"
        print(f"== {name}: building weights ({timing.rotation_bytes() / 1e6:.0f} MB rotation per method, "
              f"{time.monotonic() - t_start:.0f} s elapsed)")
        lw_cache: dict[str, methods.LordsWeights] = {}

        def lords_weights(N=N, K=K):
            if "w" not in lw_cache:
                lw_cache["w"] = methods.LordsWeights(N, K, device, seed=args.seed)
            return lw_cache["w"]

        contenders, floor_variants = [], []
        for key in args.keys:
            try:
                built = methods.build(key, N, K, device, lords_weights)
            except methods.Unavailable as exc:
                skipped[key] = str(exc)
                print(f"  skip {key}: {exc}")
                continue
            except Exception as exc:  # noqa: BLE001 - report and go on with the others
                skipped[key] = f"build failed: {type(exc).__name__}: {exc}"
                print(f"  skip {key}: build failed: {type(exc).__name__}: {exc}")
                continue
            if isinstance(built, list):
                floor_variants.extend(built)
            else:
                contenders.append(built)
                print(f"  built {built.label}: {len(built.copies)} copies x {built.bytes_per_copy / 1e6:.2f} MB ({built.note})")
        if floor_variants:
            floors[name] = measure_floor(shape, floor_variants, args.target_s, device)
            del floor_variants
        for M in args.m_list:
            print(f"-- {name} M={M} ({time.monotonic() - t_start:.0f} s elapsed)")
            gen = torch.Generator(device=device).manual_seed(args.seed * 1_000_003 + M * 7919 + N + K)
            x = torch.randn(M, K, device=device, generator=gen).to(methods.DTYPE)
            for c in contenders:
                if args.budget_s is not None and time.monotonic() - t_start > args.budget_s:
                    results.append(record(shape, M, c, "skipped", reason="time budget (--budget-s) spent"))
                    continue
                results.append(run_case(shape, M, c, x, args.target_s, device))
            del x
        del contenders
        lw_cache.clear()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if checkpoint is not None:
            checkpoint({"results": results, "floors": floors, "unavailable": skipped,
                        "seconds": time.monotonic() - t_start, "partial": True})
    return {"results": results, "floors": floors, "unavailable": skipped,
            "seconds": time.monotonic() - t_start}


# --- reporting ----------------------------------------------------------------------------------

def _index(results):
    table: dict[tuple[str, str], dict[int, dict]] = {}
    for r in results:
        table.setdefault((r["shape"], r["key"]), {})[r["M"]] = r
    return table


def summarize(report: dict[str, Any]) -> dict[str, Any]:
    """Per shape and M: best LoRDS, bnb, cuBLAS, best existing kernel, floor, and the ratios."""
    out: dict[str, Any] = {}
    by_case: dict[tuple[str, int], list[dict]] = {}
    for r in report["results"]:
        if r["status"] == "ok":
            by_case.setdefault((r["shape"], r["M"]), []).append(r)
    for (shape, M), rows in sorted(by_case.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        def best(pred):
            cands = [r for r in rows if pred(r)]
            return min(cands, key=lambda r: r["us"]) if cands else None
        lords = best(lambda r: r["family"] == "lords")
        bnb = best(lambda r: r["key"] == "bnb_nf4")
        cub = best(lambda r: r["key"] == "cublas")
        exist = best(lambda r: r["family"] == EXISTING)
        floor = report["floors"].get(shape)
        s: dict[str, Any] = {"lords": lords and {"key": lords["key"], "us": lords["us"]},
                             "best_existing": exist and {"key": exist["key"], "us": exist["us"]}}
        if lords:
            if bnb:
                s["bnb_over_lords"] = bnb["us"] / lords["us"]
            if cub:
                s["cublas_over_lords"] = cub["us"] / lords["us"]
            if exist:
                s["existing_over_lords"] = exist["us"] / lords["us"]
            if floor:
                s["lords_over_floor"] = lords["us"] / floor["us"]
        if bnb and floor:
            s["bnb_over_floor"] = bnb["us"] / floor["us"]
        out.setdefault(shape, {})[M] = s
    return out


SHORT = {"lords_cuda": "cuda", "lords_triton": "triton", "lords_reference": "ref", "lords_op": "op",
         "lords_linear": "linear", "cublas": "cuBLAS", "bnb_nf4": "bnb", "bnb_nf4_dq": "bnb-dq",
         "torch_int4": "int4", "gemlite": "gemlite", "qlora": "qlora"}


def format_table(report: dict[str, Any]) -> str:
    results, floors = report["results"], report["floors"]
    summary = summarize(report)
    idx = _index(results)
    lines = []
    shapes = list(dict.fromkeys(r["shape"] for r in results))
    for shape in shapes:
        ms = sorted({r["M"] for r in results if r["shape"] == shape})
        keys = list(dict.fromkeys(r["key"] for r in results if r["shape"] == shape))
        fl = floors.get(shape)
        head = f"{shape} (N x K), bf16, us per call"
        if fl:
            head += f"; read floor {fl['bytes'] / 1e6:.2f} MB in {fl['us']:.2f} us ({fl['tb_per_s']:.2f} TB/s)"
        lines.append(head)
        w = 8
        lines.append(f"{'method':<22s}" + "".join(f"{m:>{w}d}" for m in ms))

        def cell(r):
            if r is None:
                return f"{'':>{w}s}"
            if r["status"] == "ok":
                v = r["us"]
                txt = f"{v:.1f}" if v < 1000 else f"{v:.0f}"
                return f" {txt + ('' if r['graph'] else '*'):>{w - 1}s}"
            return f"{ {'wrong': 'ERR', 'skipped': 'skip', 'error': 'fail'}[r['status']]:>{w}s}"

        for key in keys:
            row = idx.get((shape, key), {})
            label = next(iter(row.values()))["label"] if row else key
            lines.append(f"{label:<22s}" + "".join(cell(row.get(m)) for m in ms))

        def ratio_text(v):
            if v is None:
                return "-"
            return f"{v:.2f}" if v < 10 else f"{v:.1f}" if v < 100 else f"{v:.0f}"

        def ratio_row(label, field):
            vals = [summary.get(shape, {}).get(m, {}).get(field) for m in ms]
            if all(v is None for v in vals):
                return
            lines.append(f"{label:<22s}" + "".join(f" {ratio_text(v):>{w - 1}s}" for v in vals))

        def name_row(label, field):
            vals = [summary.get(shape, {}).get(m, {}).get(field) for m in ms]
            if all(v is None for v in vals):
                return
            lines.append(f"{label:<22s}" + "".join(f" {(SHORT.get(v['key'], v['key']) if v else '-')[:w - 1]:>{w - 1}s}"
                                                   for v in vals))

        name_row("LoRDS best is", "lords")
        ratio_row("x vs bnb NF4", "bnb_over_lords")
        ratio_row("x vs cuBLAS", "cublas_over_lords")
        name_row("best existing is", "best_existing")
        ratio_row("x vs best existing", "existing_over_lords")
        ratio_row("LoRDS / floor", "lords_over_floor")
        ratio_row("bnb / floor", "bnb_over_floor")
        lines.append("")
    lines.append("x vs Y = Y time / LoRDS-best time (>1: LoRDS faster); ERR = wrong result (not timed); "
                 "* = timed eagerly (graph capture failed); best existing = fastest of cuBLAS, bnb NF4, torch int4, gemlite.")
    if report.get("unavailable"):
        lines.append("not run: " + "; ".join(f"{k} ({v[:90]})" for k, v in report["unavailable"].items()))
    return "\n".join(lines)


def plot(report: dict[str, Any], plot_dir: str) -> list[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:  # noqa: BLE001
        print(f"plot skipped: matplotlib is not available ({type(exc).__name__}: {exc})")
        return []
    os.makedirs(plot_dir, exist_ok=True)
    paths = []
    idx = _index(report["results"])
    for shape in dict.fromkeys(r["shape"] for r in report["results"]):
        fig, ax = plt.subplots(figsize=(8, 5.5))
        for (s, key), row in idx.items():
            if s != shape:
                continue
            pts = sorted((m, r["us"]) for m, r in row.items() if r["status"] == "ok")
            if not pts:
                continue
            label = next(iter(row.values()))["label"]
            style = "-" if row[pts[0][0]]["family"] == "lords" else "--"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", ms=3, label=label,
                    lw=2 if style == "-" else 1.2)
        fl = report["floors"].get(shape)
        if fl:
            ax.axhline(fl["us"], color="gray", ls=":", label=f"read floor ({fl['bytes'] / 1e6:.1f} MB)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens M")
        ax.set_ylabel("us per call (CUDA graph, weights past L2)")
        gpu = report.get("environment", {}).get("gpu", "")
        ax.set_title(f"{shape} (N x K), bf16, {gpu}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", framealpha=0.85)
        path = os.path.join(plot_dir, f"latency_{shape}.png")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def _jsonable(o):
    """Strict JSON: infinite/NaN errors become null, keys become strings."""
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {str(k): _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if isinstance(o, (str, int, bool)) or o is None:
        return o
    return str(o)


_LOG_CASE = re.compile(r"^  (?P<label>.+?)\s+M=(?P<M>\d+)\s+(?P<rest>.*)$")
_LOG_TIME = re.compile(r"^(?P<us>[\d.]+) us  \[p10 (?P<p10>[\d.]+), p90 (?P<p90>[\d.]+)\]  err (?P<err>\S+)")
_LOG_FLOOR = re.compile(r"^  floor (?P<note>.+): (?P<us>[\d.]+) us \(")
_LOG_BUILT = re.compile(r"^  built (?P<label>.+?): (?P<copies>\d+) copies x (?P<mb>[\d.]+) MB \((?P<note>.*)\)$")


def report_from_log(path: str) -> dict[str, Any]:
    """The report of a run, parsed back from its progress lines (for a run stopped before the end).
    Keys and families come from the labels of methods.py; per-case detail beyond the printed
    figures (replay counts, calls per replay) is not in the log and stays absent."""
    label_key = {}
    results: list[dict[str, Any]] = []
    floors: dict[str, Any] = {}
    env: dict[str, Any] = {}
    shape, built = None, {}
    with open(path) as fh:
        for line in fh:
            line = line.rstrip("\n")
            if line.startswith("environment: "):
                m = re.search(r"gpu=([^,]+)", line)
                env["gpu"] = m.group(1) if m else "?"
                env["line"] = line[len("environment: "):]
            elif line.startswith("== "):
                shape = line[3:].split(":")[0]
                built = {}
            elif (m := _LOG_BUILT.match(line)):
                built[m["label"]] = (int(m["copies"]), float(m["mb"]) * 1e6, m["note"])
            elif (m := _LOG_FLOOR.match(line)):
                N, K = (int(v) for v in shape.split("x"))
                nbytes = methods.lords_bytes(N, K, 4, methods.parity_rank(N, K))
                us = float(m["us"])
                if shape not in floors or us < floors[shape]["us"]:
                    floors[shape] = {"us": us, "bytes": nbytes, "tb_per_s": nbytes / us / 1e6, "variant": m["note"]}
            elif shape and (m := _LOG_CASE.match(line)):
                label, M, rest = m["label"].strip(), int(m["M"]), m["rest"]
                if not label_key:
                    label_key.update(_labels())
                key, family = label_key.get(label, (label, "existing"))
                N, K = (int(v) for v in shape.split("x"))
                copies, nbytes, note = built.get(label, (0, 0, ""))
                rec = {"shape": shape, "N": N, "K": K, "M": M, "key": key, "label": label, "family": family,
                       "copies": copies, "bytes_per_copy": nbytes, "note": note}
                if (t := _LOG_TIME.match(rest)):
                    rec.update(status="ok", us=float(t["us"]), p10_us=float(t["p10"]), p90_us=float(t["p90"]),
                               rel_err=float(t["err"]), graph="(eager" not in rest,
                               info=rest.split("weights", 1)[1].strip() if "weights" in rest else "")
                elif rest.startswith("WRONG"):
                    rec.update(status="wrong", reason=rest)
                elif rest.startswith("skip"):
                    rec.update(status="skipped", reason=rest)
                else:
                    rec.update(status="error", reason=rest)
                results.append(rec)
    return {"results": results, "floors": floors, "unavailable": {}, "environment": env,
            "seconds": float("nan"), "from_log": os.path.abspath(path)}


def _labels() -> dict[str, tuple[str, str]]:
    """label -> (key, family) for every contender label methods.py can print."""
    out = {f"LoRDS {n}": (f"lords_{n}", "lords") for n in ("cuda", "triton", "reference")}
    out.update({"LoRDS op": ("lords_op", "lords"), "LordsLinear": ("lords_linear", "lords"),
                "cuBLAS bf16": ("cublas", "existing"), "bnb NF4": ("bnb_nf4", "existing"),
                "bnb NF4 (double quant)": ("bnb_nf4_dq", "existing"),
                f"QLoRA NF4+r{methods.LORA_RANK}": ("qlora", "qlora"),
                "torch int4 g64": ("torch_int4", "existing"), "gemlite A16W4 g64": ("gemlite", "existing")})
    return out


def _write(report: dict[str, Any], path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(_jsonable(report), fh, indent=1)
    os.replace(tmp, path)


def _finish(report: dict, args, out_dir: str, footer: str) -> int:
    """Summary, JSON, plots, then the table last (the device tool returns the end of the output)."""
    report["summary"] = summarize(report)
    _write(report, args.out)
    print(f"wrote {args.out}")
    if (args.plot_dir or "").lower() != "none":
        for p in plot(report, args.plot_dir or out_dir):
            print(f"wrote {p}")
    print(footer)
    print()
    print(format_table(report))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if args.from_log:
        report = report_from_log(args.from_log)
        report["command"] = f"(rebuilt from {args.from_log})"
        return _finish(report, args, out_dir,
                       f"(rebuilt from the log {args.from_log}; {report['environment'].get('gpu', '?')})")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_kernels: no CUDA GPU is visible; nothing to time (run it on a GPU machine, e.g. bench/run_h100.sh)")
        return 2
    timing.MIN_ROTATION_BYTES = int(args.rotation_mb * 1e6)
    env = environment(device)
    print("environment: " + ", ".join(f"{k}={v}" for k, v in env.items()))
    print(f"shapes {[f'{n}x{k}' for n, k in args.shape_list]}, M {args.m_list}, methods {args.keys}")
    command = " ".join([os.path.basename(sys.executable), "-m", "bench.bench_kernels"]
                       + (argv if argv is not None else sys.argv[1:]))

    def checkpoint(partial: dict[str, Any]) -> None:
        _write({**partial, "environment": env, "command": command}, args.out)

    with torch.no_grad():
        report = run(args, checkpoint)
    report["environment"] = env
    report["command"] = command
    return _finish(report, args, out_dir,
                   f"({report['seconds']:.0f} s of benchmarking on {env['gpu']}; command: {report['command']})")


if __name__ == "__main__":
    sys.exit(main())
