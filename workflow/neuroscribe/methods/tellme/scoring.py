"""TeLLMe's scores: each candidate's simulation against the neuron's real values.

The score is Pearson's correlation, in [-1, 1] (the reference reports it times 100 and, dividing
by an n-1 standard deviation, shrinks it by (n-1)/n; this one is not shrunk). The best candidate
is chosen on the validation part of the scoring sample; its reported score comes from the test
part, which played no part in the choice.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# fewer scored items than this in a part: no correlation is reported for it
MIN_ITEMS = 4


def correlation(predicted: np.ndarray, actual: np.ndarray) -> tuple[float | None, str | None]:
    """Pearson's r over the items both have (a missing prediction is NaN and left out), or None
    and the reason it is undefined."""
    predicted = np.asarray(predicted, dtype=np.float64)
    actual = np.asarray(actual, dtype=np.float64)
    keep = np.isfinite(predicted) & np.isfinite(actual)
    if keep.sum() < MIN_ITEMS:
        return None, f"{int(keep.sum())} items with a prediction, fewer than {MIN_ITEMS}"
    p, a = predicted[keep] - predicted[keep].mean(), actual[keep] - actual[keep].mean()
    if not np.any(p):
        return None, "the simulator predicted the same value for every item"
    if not np.any(a):
        return None, "the neuron's value is the same on every item"
    return float((p * a).sum() / np.sqrt((p * p).sum() * (a * a).sum())), None


@dataclass
class Choice:
    """The chosen candidate (None: no candidate), every candidate's validation and test r, and
    why the choice or the score is missing, if it is."""

    index: int | None
    validation_r: list[float | None]
    test_r: list[float | None]
    reason: str | None

    @property
    def score(self) -> float | None:
        return None if self.index is None else self.test_r[self.index]


def choose(predictions: np.ndarray, actual: np.ndarray, validation: np.ndarray) -> Choice:
    """The candidate (row of `predictions` [candidates, items]) with the best validation r; when
    no candidate has one, the explainer's first, saying so."""
    validation = np.asarray(validation, dtype=bool)
    val, test, reasons = [], [], []
    for row in np.atleast_2d(predictions):
        r, why = correlation(row[validation], actual[validation])
        val.append(r)
        reasons.append(why)
        test.append(correlation(row[~validation], actual[~validation])[0])
    if not val:
        return Choice(None, [], [], "no candidate explanation")
    scored = [i for i, r in enumerate(val) if r is not None]
    if scored:
        index = max(scored, key=lambda i: (val[i], -i))
        reason = None
    else:
        index = 0
        reason = f"chosen without validation (the explainer's first): {reasons[0]}"
    if test[index] is None:
        why = correlation(predictions[index][~validation], actual[~validation])[1]
        reason = f"{reason}; " if reason else ""
        reason += f"no test score: {why}"
    return Choice(index, val, test, reason)
