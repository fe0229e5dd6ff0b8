"""bench/stream_k_rule_fit.py against the data the stream-K rule's constants were fitted to.

The constants of `fused_stream_k_preferred` live in csrc/fused_gemm.cu; the timing they were fitted to (18 shapes,
16 tokens, H100) is committed under bench/h100/session23/release_check/. The rule in the fit script must agree with
the C++ one, and those constants must put every one of the 18 shapes on its faster path there: changing either
without the other fails here.
"""
import importlib.util
import json
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DATA = ROOT / "bench/h100/session23/release_check/dp_0_base.json"
_spec = importlib.util.spec_from_file_location("stream_k_rule_fit", ROOT / "bench" / "stream_k_rule_fit.py")
fit = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fit)


def cxx_constants():
    src = (ROOT / "csrc/fused_gemm.cu").read_text()
    m = re.search(r"constexpr long kSplitWaveSteps = (\d+), kStreamKFixedSteps = (\d+), kStreamKShareSteps = (\d+);",
                  src)
    assert m, "the rule's constants are no longer declared as the fit script expects"
    return tuple(int(v) for v in m.groups())


def records():
    return [r for r in json.loads(DATA.read_text()) if r["M"] == 16 and (r["N"], r["K"]) in fit.PLANS]


def test_constants_put_every_fitted_shape_on_its_faster_path():
    assert len(records()) == 18
    total, misses = fit.excess(records(), *cxx_constants())
    assert misses == [] and total == 0.0


def test_session22_constants_missed_on_this_data():
    """The refit was needed: session 22's rule (no share term, 14 half steps fixed) chose the slower path here."""
    total, misses = fit.excess(records(), 3, 14, 0)
    assert total > 4.0 and any(m.startswith("14336x4096") for m in misses)


@pytest.mark.parametrize("n,k,expect_sk", [(14336, 4096, True), (7168, 7168, True), (3072, 8192, False),
                                           (4096, 4096, False), (5120, 13824, True)])
def test_integer_form_of_the_cxx_rule_agrees(n, k, expect_sk):
    """The C++ rule compares tiles x (split-K - 2 sk - FIXED) > SHARE x SMs in integers; the script in floats."""
    split, fixed, share = cxx_constants()
    splits, waves = fit.PLANS[(n, k)]
    tiles, k_super = -(-n // fit.ROWS), k // fit.K_SUPER
    split_steps = waves * (2 * -(-k_super // splits) + split)
    sk_steps = -(-(tiles * k_super) // fit.SMS)
    cxx = tiles * (split_steps - 2 * sk_steps - fixed) > share * fit.SMS
    a, b = fit.steps(n, k, split, fixed, share)
    assert cxx == (a > b) == expect_sk
