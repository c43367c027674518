"""The exactness checks themselves, on outputs built by hand: the channel verifier
(`verify_width`, what `engine.apply` reports as report["verification"]) and the check the
structural removals share (`compare_exact`), with the tolerance both use."""

from __future__ import annotations

import pytest
import torch

from engine.errors import PruneScopeError
from engine.transform.exactness import compare_exact, exact_tolerance, verify_width

F64 = torch.float64


def t(*values, dtype=F64):
    return torch.tensor(values, dtype=dtype)


# ---------------------------------------------------------------------------- tolerance
def test_tolerance_is_1e4_in_float32_and_four_epsilons_in_half_precision():
    assert exact_tolerance([torch.float32]) == 1e-4
    assert exact_tolerance([torch.float64]) == 1e-4
    assert exact_tolerance([torch.float16]) == 4 * 2.0 ** -10
    assert exact_tolerance([torch.bfloat16]) == 4 * 2.0 ** -7
    assert exact_tolerance([torch.float32, torch.float16, torch.bfloat16]) == 4 * 2.0 ** -7
    assert exact_tolerance([torch.int64, torch.bool]) == 1e-4  # integer outputs: no epsilon
    assert exact_tolerance([]) == 1e-4


# ------------------------------------------------------------------------ compare_exact
def test_compare_exact_reports_the_differences():
    got = compare_exact([t(0.0, 10000.0), t(3.0)], [t(0.5, 10000.0), t(3.0)], "depth", "m")
    assert got == {"max_abs_diff_vs_masked": 0.5, "relative_diff_vs_masked": 0.5 / 10000.0,
                   "exact": True}


def test_compare_exact_accepts_exactly_the_tolerance_and_refuses_more():
    # 1 / 10000 is the double nearest 1e-4: on the boundary, still exact
    assert compare_exact([t(0.0, 1e4)], [t(1.0, 1e4)], "depth", "m")["exact"]
    with pytest.raises(PruneScopeError) as caught:
        compare_exact([t(0.0, 1e4)], [t(1.5, 1e4)], "expert", "with experts masked")
    assert str(caught.value) == ("expert verification failed: the reduced model differs from "
                                 "the original with experts masked by 0.00015 (relative)")


@pytest.mark.parametrize(("expected", "got"), [
    ([t(1.0, 2.0)], [t(1.0, 2.0), t(1.0)]),  # one output more
    ([t(1.0, 2.0), t(1.0)], [t(1.0, 2.0)]),  # one output fewer
    ([t(1.0, 2.0)], [t(1.0)]),  # same count, another shape
    ([t(1.0), t(1.0, 2.0)], [t(1.0), t(1.0)]),  # the second output's shape
])
def test_compare_exact_refuses_changed_shapes(expected, got):
    with pytest.raises(PruneScopeError, match="^depth verification failed: the output shapes "
                                              "changed$"):
        compare_exact(expected, got, "depth", "m")


def test_compare_exact_ignores_integer_and_empty_outputs():
    ints = [torch.tensor([1, 2]), torch.empty(0)]
    got = compare_exact(ints, [torch.tensor([5, 9]), torch.empty(0)], "depth", "m")
    assert got["max_abs_diff_vs_masked"] == 0.0 and got["relative_diff_vs_masked"] == 0.0


def test_compare_exact_with_zero_outputs_uses_the_absolute_difference():
    assert compare_exact([t(0.0, 0.0)], [t(0.0, 5e-5)], "d", "m")["relative_diff_vs_masked"] \
        == 5e-5
    with pytest.raises(PruneScopeError, match="by 0.001 "):
        compare_exact([t(0.0, 0.0)], [t(0.0, 1e-3)], "d", "m")


def test_compare_exact_scale_is_the_largest_expected_magnitude():
    got = compare_exact([t(-8.0, 1.0), t(2.0)], [t(-8.0, 1.0), t(2.0004)], "d", "m")
    assert got["relative_diff_vs_masked"] == pytest.approx(0.0004 / 8.0)


def test_compare_exact_uses_the_half_precision_tolerance():
    half = [t(0.0, 1.0, dtype=torch.float16)]
    near = [t(2.0 ** -9, 1.0, dtype=torch.float16)]  # 2e-3 relative: within 4 epsilons
    assert compare_exact(half, near, "d", "m")["exact"]
    with pytest.raises(PruneScopeError):
        compare_exact([t(0.0, 1.0)], [t(2.0 ** -9, 1.0)], "d", "m")  # the same in float64


# ------------------------------------------------------------------------ verify_width
def test_verify_width_reports_an_exact_prune():
    got = verify_width([t(0.0, 10000.0), t(3.0)], [t(0.5, 10000.0), t(3.0)],
                       {"a": True, "b": True})
    assert got == {"output_shapes_match": True, "max_abs_diff_vs_masked": 0.5,
                   "relative_diff_vs_masked": 0.5 / 10000.0, "exact": True,
                   "tolerance": 1e-4, "exact_expected": True, "inexact_groups": []}


def test_verify_width_on_the_boundary_and_beyond():
    assert verify_width([t(0.0, 1e4)], [t(1.0, 1e4)], {"a": True})["exact"]
    with pytest.raises(PruneScopeError) as caught:
        verify_width([t(0.0, 1e4)], [t(1.5, 1e4)], {"a": True})
    assert str(caught.value) == ("verification failed: the pruned model differs from the "
                                 "masked original by 0.00015 (relative), where it must agree "
                                 "exactly")


def test_verify_width_lets_an_inexact_group_differ_and_names_it():
    got = verify_width([t(1.0, 2.0)], [t(1.5, 2.0)], {"a": True, "ln": False, "b": True})
    assert got["exact"] is False and got["exact_expected"] is False
    assert got["inexact_groups"] == ["ln"]
    assert got["max_abs_diff_vs_masked"] == 0.5 and got["relative_diff_vs_masked"] == 0.25
    # an inexact group whose prune happens to agree is still not called exact
    same = verify_width([t(1.0, 2.0)], [t(1.0, 2.0)], {"ln": False})
    assert same["exact"] is False and same["relative_diff_vs_masked"] == 0.0


def test_verify_width_with_nothing_pruned_expects_exactness():
    got = verify_width([t(1.0)], [t(1.0)], {})
    assert got["exact"] is True and got["exact_expected"] is True


@pytest.mark.parametrize(("masked", "pruned"), [
    ([t(1.0, 2.0)], [t(1.0, 2.0), t(1.0)]),
    ([t(1.0, 2.0)], [t(1.0)]),
    ([t(1.0), t(1.0, 2.0)], [t(1.0), t(1.0)]),
])
@pytest.mark.parametrize("exact", [True, False])
def test_verify_width_refuses_changed_shapes_even_for_inexact_groups(masked, pruned, exact):
    with pytest.raises(PruneScopeError, match="^verification failed: the pruned model's output "
                                              "shapes changed$"):
        verify_width(masked, pruned, {"a": exact})


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("exact", [True, False])
def test_verify_width_refuses_non_finite_outputs_mask_mode_does_not_have(bad, exact):
    with pytest.raises(PruneScopeError, match="NaN or infinite outputs where the masked "
                                              "original does not"):
        verify_width([t(1.0, 2.0)], [t(1.0, bad)], {"a": exact})


def test_verify_width_accepts_non_finite_values_exactly_where_mask_mode_has_them():
    same = verify_width([t(float("nan"), 2.0, float("inf"))], [t(float("nan"), 2.0, float("inf"))],
                        {"a": True})
    assert same["exact"] and same["max_abs_diff_vs_masked"] == 0.0
    with pytest.raises(PruneScopeError, match="NaN or infinite"):  # an infinity turned finite
        verify_width([t(2.0, float("inf"))], [t(2.0, 7.0)], {"a": False})


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_verify_width_names_mask_mode_when_only_the_masked_original_is_not_finite(bad):
    with pytest.raises(PruneScopeError, match="^verification failed: the masked original gives "
                                              "NaN or infinite outputs where the pruned model "
                                              "does not$"):
        verify_width([t(1.0, 2.0), t(bad, 3.0)], [t(1.0, 2.0), t(5.0, 3.0)], {"a": True})
    # both sides non-finite, at different places: the pruned model's is named first
    with pytest.raises(PruneScopeError, match="^verification failed: the pruned model gives"):
        verify_width([t(bad, 2.0)], [t(1.0, bad)], {"a": False})


def test_verify_width_ignores_integer_and_empty_outputs():
    got = verify_width([torch.tensor([1, 2]), torch.empty(0), t(4.0)],
                       [torch.tensor([7, 9]), torch.empty(0), t(4.0)], {"a": True})
    assert got["exact"] and got["max_abs_diff_vs_masked"] == 0.0


def test_verify_width_with_zero_outputs_uses_the_absolute_difference():
    assert verify_width([t(0.0)], [t(5e-5)], {"a": True})["relative_diff_vs_masked"] == 5e-5
    with pytest.raises(PruneScopeError):
        verify_width([t(0.0)], [t(1e-3)], {"a": True})


def test_verify_width_scale_is_the_largest_masked_magnitude_over_all_outputs():
    got = verify_width([t(-8.0, 1.0), t(2.0)], [t(-8.0, 1.0), t(2.0004)], {"a": True})
    assert got["max_abs_diff_vs_masked"] == pytest.approx(0.0004)
    assert got["relative_diff_vs_masked"] == pytest.approx(0.0004 / 8.0)
    got = verify_width([t(2.0), t(-8.0, 1.0)], [t(2.0004), t(-8.0, 1.0)], {"a": True})
    assert got["relative_diff_vs_masked"] == pytest.approx(0.0004 / 8.0)


def test_verify_width_uses_the_half_precision_tolerance():
    half = [t(0.0, 1.0, dtype=torch.float16)]
    got = verify_width(half, [t(2.0 ** -9, 1.0, dtype=torch.float16)], {"a": True})
    assert got["exact"] and got["tolerance"] == 4 * 2.0 ** -10


def test_outputs_smaller_than_one_are_compared_relative_to_their_scale():
    """Scale 0.5: a difference of 6e-5 is 1.2e-4 relative, beyond the tolerance."""
    with pytest.raises(PruneScopeError, match="by 0.00012 "):
        verify_width([t(0.0, 0.5)], [t(6e-5, 0.5)], {"a": True})
    with pytest.raises(PruneScopeError, match="by 0.00012 "):
        compare_exact([t(0.0, 0.5)], [t(6e-5, 0.5)], "depth", "m")
    assert verify_width([t(0.0, 0.5)], [t(4e-5, 0.5)], {"a": True})["relative_diff_vs_masked"] \
        == pytest.approx(8e-5)
