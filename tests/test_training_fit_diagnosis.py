import pytest

from lmpipe.training.fit_diagnosis import diagnose_fit


def curve(values, every=10):
    return [(every * (i + 1), float(v)) for i, v in enumerate(values)]


# Training loss logged every 10 steps over 200 steps, falling steadily from 4.0 to about 2.0.
FALLING_TRAIN = curve([4.0 - 0.1 * i for i in range(20)])


def test_val_loss_climbing_back_while_train_loss_falls_is_overfitting():
    val = curve([3.9, 3.5, 3.1, 2.9, 2.8, 2.85, 3.0, 3.2], every=25)  # best 2.8 at step 125, ends at 3.2
    fit = diagnose_fit(FALLING_TRAIN, val)
    assert fit["verdict"] == "overfitting"
    assert fit["best_val_loss"] == 2.8 and fit["best_val_step"] == 125
    assert fit["final_val_loss"] == 3.2
    # Final train loss: mean of the last 10% of the curve (the last 2 of 20 points).
    assert fit["final_train_loss"] == pytest.approx((2.2 + 2.1) / 2)
    assert fit["generalization_gap"] == pytest.approx(3.2 - 2.15)
    assert "2.8000" in fit["reason"] and "3.2000" in fit["reason"]


def test_val_loss_still_falling_at_the_end_is_underfitting():
    val = curve([3.9, 3.6, 3.3, 3.0, 2.8, 2.6, 2.45, 2.3], every=25)
    fit = diagnose_fit(FALLING_TRAIN, val)
    assert fit["verdict"] == "underfitting"
    # Last quarter: 2.45 -> 2.3, a 6.1% drop.
    assert "6.1%" in fit["reason"]


def test_flat_curves_are_converged():
    train = curve([4.0, 3.0, 2.6, 2.5] + [2.45] * 16)
    val = curve([3.5, 2.9, 2.7, 2.62, 2.6, 2.6, 2.599, 2.6], every=25)
    fit = diagnose_fit(train, val)
    assert fit["verdict"] == "converged"
    assert fit["generalization_gap"] == pytest.approx(2.6 - 2.45)


def test_a_rise_within_tolerance_is_not_overfitting():
    val = curve([3.0, 2.8, 2.7, 2.70, 2.705, 2.71], every=25)  # 0.4% above the best
    assert diagnose_fit(FALLING_TRAIN, val, tolerance=0.01)["verdict"] == "converged"
    assert diagnose_fit(FALLING_TRAIN, val, tolerance=0.001)["verdict"] == "overfitting"


def test_val_rising_while_train_does_not_fall_is_diverging_not_overfitting():
    # Memorisation needs the training loss to keep falling past the best validation step.
    train = curve([4.0, 3.0, 2.5] + [2.5] * 17)
    val = curve([3.0, 2.6, 2.6, 2.7, 2.8], every=40)
    fit = diagnose_fit(train, val)
    assert fit["verdict"] == "diverging"
    assert "did not fall" in fit["reason"]


@pytest.mark.parametrize(
    ("train", "val"),
    [
        (FALLING_TRAIN, []),
        (FALLING_TRAIN, curve([3.0])),
        ([], curve([3.0, 2.0])),
    ],
)
def test_too_little_to_judge_is_unknown(train, val):
    fit = diagnose_fit(train, val)
    assert fit["verdict"] == "unknown"
    assert "best_val_loss" not in fit


def test_a_val_loss_of_zero_is_judged_without_dividing_by_it():
    # A task learnt perfectly: val loss 0 from the start of the last quarter on (it divided by zero before).
    fit = diagnose_fit(FALLING_TRAIN, curve([0.4, 0.1, 0.0, 0.0], every=50))
    assert fit["verdict"] == "converged" and fit["best_val_loss"] == 0.0
    # Any rise above a best of 0 exceeds a relative tolerance.
    assert diagnose_fit(FALLING_TRAIN, curve([0.4, 0.0, 0.0, 0.2], every=50))["verdict"] == "overfitting"


def test_negative_losses_compare_by_their_size():
    # A policy-gradient objective can be negative: climbing from -1.0 to -0.5 is a rise, not a fall.
    flat_train = curve([-1.0] * 20)
    assert diagnose_fit(flat_train, curve([-0.8, -1.0, -0.9, -0.5], every=50))["verdict"] == "diverging"
    fit = diagnose_fit(flat_train, curve([-0.2, -0.4, -0.5, -1.0], every=50))
    assert fit["verdict"] == "underfitting" and "100.0%" in fit["reason"]
    zero_start = diagnose_fit(flat_train, curve([1.0, 0.5, 0.0, -0.5], every=50))
    assert zero_start["verdict"] == "underfitting" and "0.5 (from 0)" in zero_start["reason"]
