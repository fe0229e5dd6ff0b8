"""bench/ab_table.py: the side-by-side table of ab_patches_h100.sh, on the session-6 H100 files."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
H100 = ROOT / "bench" / "h100"


def _mod():
    spec = importlib.util.spec_from_file_location("ab_table", ROOT / "bench" / "ab_table.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_decode_variants_side_by_side():
    files = [str(H100 / f"decode_paths_session6_ab_{n}.json") for n in ("0_base", "1_reassoc-nj7", "2_reassoc-w8")]
    text = _mod().table(files)
    header = text.splitlines()[0]
    assert header.endswith("| decode_paths_session6_ab_0_base | decode_paths_session6_ab_1_reassoc-nj7 "
                           "| decode_paths_session6_ab_2_reassoc-w8 |")
    rows = [line for line in text.splitlines() if line.startswith("| 14336x4096 | 1 |  | reassoc |")]
    assert rows == ["| 14336x4096 | 1 |  | reassoc | 42.74 | 39.52 | 37.44 |"]


def test_dequant_records_and_missing_cells(tmp_path):
    src = H100 / "dequant_paths_session6.json"
    partial = tmp_path / "dp_1_partial.json"
    partial.write_text('[{"N": 4096, "K": 4096, "r": 32, "kind": "dequant", "cuda_sc0_us": 20.5}]')
    text = _mod().table([str(src), str(partial)])
    assert "| 4096x4096 |  | dequant | cuda_sc0 | 22.62 | 20.50 |" in text
    assert "| 4096x4096 |  | dequant | triton | 28.46 | - |" in text
    assert "| 4096x4096 | 4096 | matmul | cuda_dequant_mm | 221.60 | - |" in text


def test_one_shape_at_two_ranks(tmp_path):
    base = tmp_path / "dp_0_base.json"
    base.write_text('[{"N": 1024, "K": 4096, "r": 12, "M": 4, "kind": "matmul", "op_us": 8.5},'
                    ' {"N": 1024, "K": 4096, "r": 49, "M": 4, "kind": "matmul", "op_us": 11.0}]')
    text = _mod().table([str(base)])
    assert "| 1024x4096 r12 | 4 | matmul | op | 8.50 |" in text
    assert "| 1024x4096 r49 | 4 | matmul | op | 11.00 |" in text
