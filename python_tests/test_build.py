"""The build path: setup.py's choices, the op registration in csrc/, the built extension when present.

These run on the CPU. Where lords_ext._C was built (CI builds it: torch CUDA build + nvcc), the tests
that load it run; set LORDS_EXPECT_CUDA_EXT=1 to make its absence a failure rather than a skip.
"""
from __future__ import annotations

import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup_ns():
    """setup.py's functions without running setup() (it only calls main() as __main__)."""
    return runpy.run_path(str(ROOT / "setup.py"), run_name="lords_setup_under_test")


def _setup_py(args, env_extra, timeout=120):
    env = {**os.environ, **env_extra}
    return subprocess.run([sys.executable, "setup.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_gencode_flags(setup_ns):
    flags = setup_ns["gencode_flags"]
    assert flags("8.0;9.0+PTX") == [
        "-gencode=arch=compute_80,code=sm_80",
        "-gencode=arch=compute_90,code=sm_90",
        "-gencode=arch=compute_90,code=compute_90",
    ]
    assert flags("9.0a") == ["-gencode=arch=compute_90a,code=sm_90a"]
    assert flags("sm_86 89") == ["-gencode=arch=compute_86,code=sm_86", "-gencode=arch=compute_89,code=sm_89"]
    with pytest.raises(SystemExit, match="LORDS_CUDA_ARCH"):
        flags("hopper")
    # 9.0a+PTX: sm_90a machine code and the portable compute_90 PTX (compute_90a PTX runs on no later GPU).
    assert flags("9.0a+PTX") == ["-gencode=arch=compute_90a,code=sm_90a", "-gencode=arch=compute_90,code=compute_90"]
    # The default covers sm_80..sm_89 (8.0 machine code runs on every 8.x GPU), sm_90 as sm_90a machine code
    # (the wgmma kernel), PTX for later GPUs.
    default = flags(setup_ns["DEFAULT_ARCH"])
    assert default == [
        "-gencode=arch=compute_80,code=sm_80",
        "-gencode=arch=compute_90a,code=sm_90a",
        "-gencode=arch=compute_90,code=compute_90",
    ]


def test_sm90a_only_decides_the_wgmma_macro(setup_ns):
    only = setup_ns["sm90a_only"]
    assert only(setup_ns["DEFAULT_ARCH"]) and only("9.0a") and only("8.0 9.0a")
    # plain sm_90 code beside sm_90a: a 9.0 GPU could load either image, so no wgmma kernel
    assert not only("9.0;9.0a") and not only("8.0;9.0+PTX") and not only("9.0")


def test_sources_are_the_csrc_files(setup_ns):
    if setup_ns["cuda_build_problem"]() is not None:
        pytest.skip("no CUDA toolkit / CUDA torch here")
    ext = setup_ns["cuda_extension"]()
    assert ext.name == "lords_ext._C"
    assert sorted(Path(s).name for s in ext.sources) == sorted(
        p.name for p in (ROOT / "csrc").iterdir() if p.suffix in (".cu", ".cpp"))
    assert "-Werror=all-warnings" in ext.extra_compile_args["nvcc"]
    assert "-Werror" in ext.extra_compile_args["cxx"]


def test_forced_cuda_build_fails_loudly_without_a_toolkit(tmp_path):
    res = _setup_py(["--version"], {"LORDS_BUILD_CUDA": "1", "CUDA_HOME": str(tmp_path / "no-cuda")})
    assert res.returncode != 0
    assert "LORDS_BUILD_CUDA=1" in res.stderr and "cannot be built" in res.stderr


def test_bad_build_flag_is_an_error():
    res = _setup_py(["--version"], {"LORDS_BUILD_CUDA": "yes"})
    assert res.returncode != 0 and "LORDS_BUILD_CUDA: expected 0, 1 or unset" in res.stderr


def test_pure_python_install_works(tmp_path):
    """LORDS_BUILD_CUDA=0: a package without lords_ext._C whose ops still run (reference backend)."""
    target = tmp_path / "site"
    env = {**os.environ, "LORDS_BUILD_CUDA": "0", "PIP_NO_INPUT": "1"}
    res = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "-v",
         "--target", str(target), str(ROOT)],
        env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "installing the pure-Python package" in res.stdout + res.stderr
    pkg = target / "lords_ext"
    assert (pkg / "__init__.py").exists() and (pkg / "backends" / "cuda.py").exists()
    assert not list(pkg.glob("_C*.so")), "LORDS_BUILD_CUDA=0 must not build the extension"
    # An editable install of a checkout puts a finder on sys.meta_path that would shadow PYTHONPATH:
    # drop it so the probe imports the package just installed into `target`.
    probe = (
        "import sys\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, '__module__', '').startswith('__editable__')]\n"
        "import torch, lords_ext\n"
        f"assert lords_ext.__file__.startswith({str(target)!r}), lords_ext.__file__\n"
        "from lords_ext.backends import cuda\n"
        "from lords_ext.formats import pack, get_codebook\n"
        "assert not cuda.built(), 'no extension expected'\n"
        "g = torch.Generator().manual_seed(0)\n"
        "q = pack(torch.randint(0, 16, (6, 32), generator=g), 4)\n"
        "B, A, x = torch.rand(6, 2, generator=g), torch.rand(2, 32, generator=g), torch.randn(3, 32, generator=g)\n"
        "cb = get_codebook('nf4')[0]\n"
        "y = torch.ops.lords.dequant_matmul(x, q, B, A, cb)\n"
        "W = cb[lords_ext.unpack(q, 4, 32).long()] * (B @ A)\n"
        "assert torch.allclose(y, x @ W.T, atol=1e-5), (y, x @ W.T)\n"
        "print('pure-python ok', lords_ext.__file__)\n"
    )
    run = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(target)})
    assert run.returncode == 0, run.stderr[-3000:]
    assert "pure-python ok" in run.stdout and str(target) in run.stdout


def test_registration_file_registers_backend_ops_only():
    text = (ROOT / "csrc" / "ops.cpp").read_text()
    assert "TORCH_LIBRARY_FRAGMENT(lords, m)" in text
    defs = re.findall(r'm\.def\(\s*"([a-z_]+)\(', text.replace('"\n      "', ""))
    # backend ops, plus cuda_features (what this build and GPU run: the sm_90a wgmma kernel or not)
    assert set(defs) == {"dequant_cuda", "dequant_matmul_cuda", "cuda_features"}
    # The public schemas belong to lords_ext/_ops.py; the extension must not redefine them.
    assert not re.search(r'm\.def\(\s*"dequant(_matmul)?\(', text)
    for impl in ("CUDA", "Meta"):
        assert f"TORCH_LIBRARY_IMPL(lords, {impl}, m)" in text


def _extension_or_skip():
    from lords_ext.backends import cuda

    if not cuda.built():
        if os.environ.get("LORDS_EXPECT_CUDA_EXT") == "1":
            pytest.fail(f"LORDS_EXPECT_CUDA_EXT=1 but lords_ext._C did not load: {cuda.LOAD_ERROR}")
        pytest.skip(f"lords_ext._C not built here ({cuda.LOAD_ERROR})")
    return cuda


def test_extension_loads_and_registers_ops():
    _extension_or_skip()
    import lords_ext._C as ext

    assert ext.__name__ == "lords_ext._C"
    schema = str(torch.ops.lords.dequant_matmul_cuda.default._schema)
    assert "Tensor? bias=None" in schema and "int path=-1" in schema and "int splits=0" in schema
    assert "dequant_cuda(Tensor qweight, Tensor B, Tensor A, Tensor codebook, int superchunks=0)" in str(
        torch.ops.lords.dequant_cuda.default._schema)
    # The public ops stay the Python ones (lords_ext/_ops.py), whatever the extension did.
    import lords_ext  # noqa: F401

    assert hasattr(torch.ops.lords, "dequant_matmul") and hasattr(torch.ops.lords, "dequant")


def test_extension_meta_kernels_give_shapes():
    _extension_or_skip()
    m = torch.device("meta")
    x = torch.empty(5, 256, device=m, dtype=torch.bfloat16)
    q = torch.empty(33, 128, device=m, dtype=torch.uint8)
    B = torch.empty(33, 7, device=m, dtype=torch.bfloat16)
    A = torch.empty(7, 256, device=m, dtype=torch.bfloat16)
    cb = torch.empty(16, device=m)
    y = torch.ops.lords.dequant_matmul_cuda(x, q, B, A, cb, None, -1, 0)
    assert y.shape == (5, 33) and y.dtype == torch.bfloat16 and y.device == m
    W = torch.ops.lords.dequant_cuda(q, B, A, cb)
    assert W.shape == (33, 256) and W.dtype == torch.bfloat16


def test_cuda_backend_without_gpu_declines():
    from lords_ext.backends import cuda, dispatch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert cuda.available() is False
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    assert not cuda.supports("dequant_matmul", x, 2)
    assert dispatch.choose("dequant_matmul", x, 2) == "reference"


def test_selftest_runs_and_passes_here():
    from lords_ext.selftest import selftest

    lines: list[str] = []
    assert selftest(out=lines.append) is True
    text = "\n".join(lines)
    assert "selftest: PASS" in text and "dispatch" in text


@pytest.mark.parametrize("tune, before", [(False, None), (False, "1"), (True, None), (True, "0")])
def test_selftest_fixes_triton_configs_unless_tune(monkeypatch, tune, before):
    """The check runs with LORDS_TRITON_TUNE=0 (fixed configs) by default, the autotuner with tune=True, and
    the variable is restored afterwards either way."""
    from lords_ext.selftest import selftest

    if before is None:
        monkeypatch.delenv("LORDS_TRITON_TUNE", raising=False)
    else:
        monkeypatch.setenv("LORDS_TRITON_TUNE", before)
    seen: list[str | None] = []
    lines: list[str] = []

    def out(line):
        seen.append(os.environ.get("LORDS_TRITON_TUNE"))
        lines.append(line)

    assert selftest(device="cpu", out=out, tune=tune) is True
    assert set(seen) == {before if tune else "0"}
    assert os.environ.get("LORDS_TRITON_TUNE") == before
    assert ("autotuned" in lines[1]) == tune
