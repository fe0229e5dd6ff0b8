"""bench/ncu_regions.py on a small synthetic ncu source page (the GPU run feeds it the real one)."""
import io
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import ncu_regions  # noqa: E402

PAGE = '''==PROF== Connected to process
"# Address","Source","Warp Stall Sampling (All Samples)","Warp Stall Sampling (Not-issued Samples)","Instructions Executed"
"0","LDG.E.128 R4, desc[UR4][R2.64]","30","25","100"
"10","IMAD R5, R4, 0x2, RZ","2","1","100"
"20","HMMA.16816.F32.BF16 R8, R12, R16, R8","5","4","400"
"30","@P0 LDS R6, [R7+UR4]","12","10","800"
"40","HMMA.16816.F32.BF16 R8, R12, R18, R8","1","1","400"
"50","SHFL.BFLY PT, R3, R2, 0x1, 0x1f","9","8","200"
"60","EXIT","0","0","100"
'''


def test_regions_split_at_first_and_last_mma():
    header, rows = ncu_regions.read_rows(PAGE)
    res = ncu_regions.summarize(header, rows)
    reg = res["regions"]
    assert reg["prologue"] == {"static": 2, "executed": 200.0, "stalls": 32.0, "reasons": Counter()}
    assert reg["main loop"] == {"static": 3, "executed": 1600.0, "stalls": 18.0, "reasons": Counter()}
    assert reg["epilogue"] == {"static": 2, "executed": 300.0, "stalls": 9.0, "reasons": Counter()}
    assert res["top"][0][3].startswith("LDG.E.128") and res["top"][1][1] == "main loop"


def test_main_prints_a_table(tmp_path, capsys):
    f = tmp_path / "page.csv"
    f.write_text(PAGE)
    assert ncu_regions.main([str(f), "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "| main loop | 3 | 1600 | 76.2 % | 18 | 30.5 % |" in out


def test_main_reads_gzip(tmp_path, capsys):
    import gzip
    f = tmp_path / "page.csv.gz"
    with gzip.open(f, "wt") as g:
        g.write(PAGE)
    assert ncu_regions.main([str(f)]) == 0
    assert "| prologue | 2 | 200 |" in capsys.readouterr().out


REASONS = '''"# Address","Source","Warp Stall Sampling (All Samples)","Instructions Executed","stall_long_sb","stall_mio","stall_mio (Not Issued)"
"0","LDG.E.128 R4, desc[UR4][R2.64]","30","100","28","2","1"
"20","HMMA.16816.F32.BF16 R8, R12, R16, R8","5","400","0","5","5"
"30","LDS R6, [R7+UR4]","15","800","0","15","9"
"40","HMMA.16816.F32.BF16 R8, R12, R18, R8","1","400","1","0","0"
"60","EXIT","0","100","0","0","0"
'''


def test_stall_reasons_per_region(capsys, monkeypatch):
    header, rows = ncu_regions.read_rows(REASONS)
    reg = ncu_regions.summarize(header, rows)["regions"]
    # the "(Not Issued)" column is a subset of the same samples: not counted again
    assert reg["prologue"]["reasons"] == Counter(long_sb=28.0, mio=2.0)
    assert reg["main loop"]["reasons"] == Counter(long_sb=1.0, mio=20.0)
    assert reg["epilogue"]["reasons"] == Counter(long_sb=0.0, mio=0.0)
    monkeypatch.setattr(sys, "stdin", io.StringIO(REASONS))
    assert ncu_regions.main(["-"]) == 0
    out = capsys.readouterr().out
    assert "stall samples: long_sb 57%, mio 43%" in out
    assert "  main loop: mio 95%, long_sb 5%" in out
