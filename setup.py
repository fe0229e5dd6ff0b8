"""Build script: the CUDA extension `lords_ext._C` where it can be built, a pure-Python package elsewhere.

Package metadata lives in pyproject.toml; this file only decides about the extension.

    LORDS_BUILD_CUDA=1   build the extension or fail (no silent fallback)
    LORDS_BUILD_CUDA=0   pure-Python package (reference and Triton backends)
    unset                build the extension when torch is importable here, is a CUDA build and a CUDA
                         toolkit (nvcc) is found; otherwise pure Python
    LORDS_CUDA_ARCH      architectures, e.g. "8.0;9.0a+PTX" (default), "9.0a", "8.0 8.6 8.9 9.0".
                         "+PTX" also embeds PTX for newer GPUs (for "9.0a+PTX" the portable
                         compute_90 PTX); "9.0a" builds sm_90a machine code.
    MAX_JOBS             parallel compile jobs (ninja)

The default "8.0;9.0a+PTX" covers sm_80, sm_86, sm_89 (machine code for 8.0 runs on every 8.x GPU) and
sm_90 (as sm_90a machine code: the re-associated decode kernel has a wgmma variant, csrc/reassoc_gemv.cu),
plus compute_90 PTX for later GPUs. The wgmma variant is compiled in, and used on a 9.0 GPU, only when
the list has sm_90a machine code and no plain sm_90 machine code (macro LORDS_SM90A): with both, the
driver could load either image.

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
DEFAULT_ARCH = "8.0;9.0a+PTX"


def say(msg: str) -> None:
    # setuptools' own log may be silenced; stderr reaches `pip install -v` and plain `python setup.py`.
    print(f"lords-ext setup: {msg}", file=sys.stderr, flush=True)


def parse_arch(spec: str) -> list[tuple[str, bool]]:
    """'8.0;9.0a+PTX' -> [('80', False), ('90a', True)]: (cc with its 'a' suffix, embed PTX)."""
    out = []
    for item in re.split(r"[;,\s]+", spec.strip()):
        if not item:
            continue
        m = re.fullmatch(r"(?:sm_|compute_)?(\d)\.?(\d)(a?)(\+PTX)?", item, flags=re.IGNORECASE)
        if m is None:
            raise SystemExit(f"LORDS_CUDA_ARCH: expected entries like '8.0', '9.0a', '9.0+PTX' or 'sm_90', got {item!r}")
        out.append((f"{m.group(1)}{m.group(2)}{m.group(3).lower()}", bool(m.group(4))))
    if not out:
        raise SystemExit("LORDS_CUDA_ARCH: no architecture given")
    return out


def gencode_flags(spec: str) -> list[str]:
    """'8.0;9.0+PTX' / 'sm_90a' / '90' -> nvcc -gencode flags. PTX for an 'a' target is the portable one
    (compute_90 for 9.0a): arch-specific PTX would not run on any later GPU."""
    flags: list[str] = []
    for cc, ptx in parse_arch(spec):
        flags.append(f"-gencode=arch=compute_{cc},code=sm_{cc}")
        if ptx:
            plain = cc.rstrip("a")
            flags.append(f"-gencode=arch=compute_{plain},code=compute_{plain}")
    return flags


def sm90a_only(spec: str) -> bool:
    """sm_90a machine code and no plain sm_90 code: a 9.0 GPU then runs the sm_90a image (LORDS_SM90A)."""
    ccs = [cc for cc, _ in parse_arch(spec)]
    return "90a" in ccs and "90" not in ccs


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
        define_macros=[("LORDS_PYTHON_MODULE", "1")] + ([("LORDS_SM90A", "1")] if sm90a_only(arch) else []),
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
