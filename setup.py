"""Build script: the CUDA extension `lords_ext._C` where it can be built, a pure-Python package elsewhere.

Package metadata lives in pyproject.toml; this file only decides about the extension.

    LORDS_BUILD_CUDA=1   build the extension or fail (no silent fallback)
    LORDS_BUILD_CUDA=0   pure-Python package (reference and Triton backends)
    unset                build the extension when torch is importable here, is a CUDA build and a CUDA
                         toolkit (nvcc) is found; otherwise pure Python
    LORDS_CUDA_ARCH      architectures, e.g. "8.0;9.0+PTX" (default), "9.0a", "8.0 8.6 8.9 9.0".
                         "+PTX" also embeds PTX for newer GPUs; "9.0a" builds sm_90a machine code.
    MAX_JOBS             parallel compile jobs (ninja)

The default "8.0;9.0+PTX" covers sm_80, sm_86, sm_89 (machine code for 8.0 runs on every 8.x GPU) and
sm_90, plus PTX for later GPUs. The kernels use no Hopper-only instruction (mma.sync, not wgmma), so
there is no sm_90a object by default; ask for "9.0a" to get one.

torch must be importable by the build: `pip install --no-build-isolation .` (pip's default isolated
build environment has no torch, which gives the pure-Python package and says so).
"""
from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
DEFAULT_ARCH = "8.0;9.0+PTX"


def say(msg: str) -> None:
    # setuptools' own log may be silenced; stderr reaches `pip install -v` and plain `python setup.py`.
    print(f"lords-ext setup: {msg}", file=sys.stderr, flush=True)


def gencode_flags(spec: str) -> list[str]:
    """'8.0;9.0+PTX' / 'sm_90a' / '90' -> nvcc -gencode flags."""
    flags: list[str] = []
    for item in re.split(r"[;,\s]+", spec.strip()):
        if not item:
            continue
        m = re.fullmatch(r"(?:sm_|compute_)?(\d)\.?(\d)(a?)(\+PTX)?", item, flags=re.IGNORECASE)
        if m is None:
            raise SystemExit(f"LORDS_CUDA_ARCH: expected entries like '8.0', '9.0a', '9.0+PTX' or 'sm_90', got {item!r}")
        cc = f"{m.group(1)}{m.group(2)}{m.group(3).lower()}"
        flags.append(f"-gencode=arch=compute_{cc},code=sm_{cc}")
        if m.group(4):
            flags.append(f"-gencode=arch=compute_{cc},code=compute_{cc}")
    if not flags:
        raise SystemExit("LORDS_CUDA_ARCH: no architecture given")
    return flags


def locate_cuda_home() -> None:
    """Point torch at a CUDA toolkit with headers when CUDA_HOME/CUDA_PATH are unset.

    torch takes the parent of the `nvcc` on PATH; where that nvcc is a wrapper script (as on the dev
    machine: /usr/local/bin/nvcc execs /usr/local/cuda-13.0/bin/nvcc) the guess has no headers."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(Path(os.path.realpath(nvcc)).parent.parent)
        try:  # a wrapper script names the real nvcc
            text = Path(nvcc).read_text(errors="ignore")[:4096]
            candidates += [Path(m).parent.parent for m in re.findall(r"(/\S+/bin/nvcc)\b", text)]
        except OSError:
            pass
    candidates.append(Path("/usr/local/cuda"))
    for home in candidates:
        if (home / "include" / "cuda_runtime_api.h").exists() and (home / "bin" / "nvcc").exists():
            os.environ["CUDA_HOME"] = str(home)
            return


def cuda_build_problem() -> str | None:
    """Why the extension cannot be built here, or None when it can."""
    locate_cuda_home()
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as e:
        return f"torch is not importable in the build environment ({e}); use `pip install --no-build-isolation .`"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is not a CUDA build"
    home = cpp_extension.CUDA_HOME
    if home is None:
        return "no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)"
    if not (Path(home) / "bin" / "nvcc").exists():
        return f"no nvcc under CUDA_HOME={home}"
    if not (Path(home) / "include" / "cuda_runtime_api.h").exists():
        return f"no CUDA headers under CUDA_HOME={home} (set CUDA_HOME to the toolkit)"
    return None


def cuda_extension():
    from torch.utils.cpp_extension import CUDAExtension

    arch = os.environ.get("LORDS_CUDA_ARCH", DEFAULT_ARCH)
    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.c*") if p.suffix in (".cpp", ".cu"))
    nvcc = [
        "-O3",
        "-std=c++20",
        "-lineinfo",
        "-Werror=all-warnings",
        "-Xcompiler=-Wall,-Werror",
        *gencode_flags(arch),
    ]
    say(f"building the CUDA extension lords_ext._C from {', '.join(sources)} for LORDS_CUDA_ARCH={arch!r}")
    return CUDAExtension(
        name="lords_ext._C",
        sources=sources,
        include_dirs=[str(ROOT / "csrc")],
        define_macros=[("LORDS_PYTHON_MODULE", "1")],
        extra_compile_args={"cxx": ["-O3", "-std=c++20", "-Wall", "-Werror"], "nvcc": nvcc},
    )


def main() -> None:
    mode = os.environ.get("LORDS_BUILD_CUDA", "").strip()
    if mode not in ("", "0", "1"):
        raise SystemExit(f"LORDS_BUILD_CUDA: expected 0, 1 or unset, got {mode!r}")
    kwargs: dict = {}
    if mode == "0":
        say("LORDS_BUILD_CUDA=0: installing the pure-Python package (reference and Triton backends, no lords_ext._C)")
    else:
        problem = cuda_build_problem()
        if problem is None:
            from torch.utils.cpp_extension import BuildExtension

            kwargs["ext_modules"] = [cuda_extension()]
            kwargs["cmdclass"] = {"build_ext": BuildExtension.with_options(use_ninja=True)}
        elif mode == "1":
            raise SystemExit(f"lords-ext setup: LORDS_BUILD_CUDA=1 but the CUDA extension cannot be built: {problem}")
        else:
            say(f"installing the pure-Python package without lords_ext._C: {problem}")
    setup(**kwargs)


if __name__ == "__main__":  # setuptools' build backend runs this file as __main__ too
    main()
