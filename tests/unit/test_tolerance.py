from __future__ import annotations

import numpy as np
import pytest

from verimesh.errors import InvalidInputError
from verimesh.jobs.tolerance import DEFAULT_TOLERANCES, Tolerance, compare_tensors

STRICT = DEFAULT_TOLERANCES["fp32-strict"]
rng = np.random.default_rng(0)
REF = rng.standard_normal((4, 256)).astype(np.float32)


def test_identical_and_tiny_noise_pass() -> None:
    assert compare_tensors("t", REF, REF, STRICT).ok
    noisy = REF * (1 + 1e-6 * rng.standard_normal(REF.shape)).astype(np.float32)
    assert compare_tensors("t", noisy.astype(np.float32), REF, STRICT).ok


def test_fp16_rounding_is_rejected_under_fp32_strict() -> None:
    result = compare_tensors("t", REF.astype(np.float16).astype(np.float32), REF, STRICT)
    assert not result.ok and "Frobenius" in result.reason


def test_single_element_perturbation_is_rejected() -> None:
    bad = REF.copy()
    bad[0, 0] += 0.01
    assert not compare_tensors("t", bad, REF, STRICT).ok


def test_nan_where_reference_is_finite_is_rejected() -> None:
    bad = REF.copy()
    bad[1, 1] = np.nan
    result = compare_tensors("t", bad, REF, DEFAULT_TOLERANCES["tf32"])
    assert not result.ok and "NaN" in result.reason


def test_argmax_flip_is_caught_even_when_small() -> None:
    ref = np.array([[1.0, 0.5, 0.2]], np.float32)
    got = np.array([[1.0, 1.01, 0.2]], np.float32)
    loose = Tolerance(rtol=1.0, atol=1.0, max_outside_fraction=1.0, max_rel_frobenius=1.0, argmax_margin=1e-3)
    result = compare_tensors("t", got, ref, loose, discrete=True)
    assert not result.ok and "argmax" in result.reason
    assert compare_tensors("t", got, ref, loose).ok  # not a model output: no argmax metric


def test_integers_must_match_exactly_and_shapes_too() -> None:
    a = np.arange(10, dtype=np.int64)
    assert compare_tensors("t", a, a, STRICT).ok
    assert not compare_tensors("t", a + (a == 3), a, STRICT).ok
    assert not compare_tensors("t", a.reshape(2, 5), a, STRICT).ok


def test_tolerance_json_round_trip_and_validation() -> None:
    assert Tolerance.from_json(STRICT.to_json()) == STRICT
    with pytest.raises(InvalidInputError):
        Tolerance.from_json({**STRICT.to_json(), "rtol": "nan"})
    with pytest.raises(InvalidInputError):
        Tolerance.from_json({**STRICT.to_json(), "rtol": 0.1})


def test_huge_values_do_not_overflow_into_a_pass() -> None:
    ref = np.full(1000, 1e30, np.float32)
    got = ref * np.float32(1.01)
    result = compare_tensors("t", got, ref, STRICT)
    assert not result.ok and np.isfinite(result.metrics["rel_frobenius"])
    assert compare_tensors("t", ref, ref.copy(), STRICT).ok


def test_matching_non_finite_patterns_compare_the_rest() -> None:
    ref = np.array([np.inf, 1.0, 2.0], np.float32)
    assert compare_tensors("t", ref.copy(), ref, STRICT).ok
    assert not compare_tensors("t", np.array([np.inf, 1.0, 2.5], np.float32), ref, STRICT).ok
