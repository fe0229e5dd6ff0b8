"""bench/sass_static.py's reading of nvdisasm text (no toolkit needed): kernels split at their .text
sections, predicated and dotted opcodes reduced to their base name, regions around the tensor-core ops."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.sass_static import kernels, regions  # noqa: E402

SASS = """\t.target\tsm_90
.text._ZN5lords14decode_kernelI6__halfLi4EEEvPKT_:
        /*0000*/                   S2R R0, SR_TID.X ;
        /*0010*/               @P0 LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0020*/                   HMMA.16816.F32.BF16 R8, R4, R6, R8 ;
        /*0030*/              @!P1 LDS R9, [R3+UR8] ;
        /*0040*/                   HMMA.16816.F32.BF16 R8, R4, R9, R8 ;
        /*0050*/                   STG.E desc[UR4][R2.64], R8 ;
        /*0060*/                   EXIT ;
.text._ZN5lords13other_kernelEv:
        /*0000*/                   EXIT ;
"""


def test_kernels_and_regions():
    found = kernels(SASS)
    assert list(found) == ["_ZN5lords14decode_kernelI6__halfLi4EEEvPKT_", "_ZN5lords13other_kernelEv"]
    ops = found["_ZN5lords14decode_kernelI6__halfLi4EEEvPKT_"]
    assert ops == ["S2R", "LDG", "HMMA", "LDS", "HMMA", "STG", "EXIT"]
    r = regions(ops)
    assert (r["total"], r["prologue"], r["main_loop"], r["epilogue"], r["tensor_ops"]) == (7, 2, 3, 2, 2)
    assert r["main_loop_ops"] == {"HMMA": 2, "LDS": 1}
    assert regions(found["_ZN5lords13other_kernelEv"]) == {"total": 1}
