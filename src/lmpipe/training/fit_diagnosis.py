"""Reading the loss curves: is the model overfitting, underfitting, or done?

- overfitting: validation loss climbed back above its best by more than `tolerance` (relative) while the
  training loss kept falling: the model memorises the training windows; stop earlier, add dropout or decay.
- underfitting: validation loss was still falling by more than `tolerance` over the last quarter of the run:
  more steps (or a bigger model) would still pay off.
- diverging: validation loss climbed back above its best while the training loss did not fall either: the
  optimisation itself is unstable; lower the learning rate or lengthen the warm-up.
- converged: none of these; the curves have flattened together.
The gap (final val loss minus final train loss) is reported too: a large positive gap is the memorisation signal.

`tolerance` is relative to the size of the loss it compares with (|best|, |start of the last quarter|), so a loss
of exactly 0 (a task learnt perfectly) or a negative one (a policy-gradient objective) is judged without dividing.
"""

from __future__ import annotations

from collections.abc import Sequence

Curve = Sequence[tuple[int, float]]


def _tail_mean(curve: Curve, fraction: float = 0.1) -> float:
    n = max(1, int(len(curve) * fraction))
    return sum(v for _, v in curve[-n:]) / n


def diagnose_fit(train: Curve, val: Curve, tolerance: float = 0.01) -> dict:
    """A verdict (`overfitting`, `diverging`, `underfitting`, `converged` or `unknown`) with the numbers behind it."""
    if len(val) < 2 or not train:
        return {"verdict": "unknown", "reason": "fewer than two validations"}
    values = [v for _, v in val]
    best = min(values)
    best_step = val[values.index(best)][0]
    final_val = values[-1]
    final_train = _tail_mean(train)
    quarter = values[-max(2, len(values) // 4) :]
    recent_drop = quarter[0] - quarter[-1]
    train_at_best = [(s, v) for s, v in train if s <= best_step]
    train_then = _tail_mean(train_at_best) if train_at_best else None
    train_fell = train_then is not None and train_then - final_train > tolerance * abs(train_then)
    rose = f"val loss rose from {best:.4f} (step {best_step}) to {final_val:.4f}"
    val_rose = final_val - best > tolerance * abs(best)
    if val_rose and train_fell:
        verdict, reason = "overfitting", rose
    elif val_rose:
        verdict, reason = "diverging", rose + " and train loss did not fall"
    elif recent_drop > tolerance * abs(quarter[0]):
        fell = f"{recent_drop / abs(quarter[0]):.1%}" if quarter[0] else f"{recent_drop:.4g} (from 0)"
        verdict, reason = "underfitting", f"val loss still fell {fell} over the last quarter"
    else:
        verdict, reason = "converged", "val loss flat over the last quarter"
    return {
        "verdict": verdict,
        "reason": reason,
        "best_val_loss": best,
        "best_val_step": best_step,
        "final_val_loss": final_val,
        "final_train_loss": final_train,
        "generalization_gap": final_val - final_train,
    }
