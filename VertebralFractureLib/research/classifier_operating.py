"""The classifier's operating point: specificity first, on held-out probabilities (used by
:mod:`.classifier_fusion` to choose it and by :mod:`.classifier_card` to state it)."""

from __future__ import annotations

import math

import numpy as np

from VertebralFractureLib.research.classifier_data import Samples

#: the operating point's budget: at most this share of real vertebrae (no fracture, held out) at or above the
#: threshold. Specificity first: Youden's J (0.21 on the first run with bridged morphometry) called 47 % of them
#: fractured, and every real CT has about 6 vertebrae, so a patient's false alarms add up over its vertebrae
MAX_FALSE_POSITIVE_RATE = 0.05
#: the budgets listed in the card beside the chosen one (what each would cost in sensitivity)
FPR_BUDGETS = (0.02, 0.05, 0.10, 0.20)


#: sources whose unfractured rows make up the false-positive budget: the real CTs' vertebrae with checked labels and,
#: when trained with them, the automatic segmentation's segments of those CTs (``run`` without ``--labels``)
BUDGET_SOURCES = ("real", "auto")


def negatives(s: Samples, *sources: str) -> np.ndarray:
    """Mask (n,) of the unfractured rows of ``sources`` (``"real"``, ``"auto"``, ``"phantom"``)."""
    return np.isin(s.source, sources) & (s.y == 0)


def budget_negatives(s: Samples) -> np.ndarray:
    """Mask (n,) of the rows the false-positive budget counts: unfractured rows of :data:`BUDGET_SOURCES`."""
    return negatives(s, *BUDGET_SOURCES)


def operating_threshold(s: Samples, p: np.ndarray, max_fpr: float = MAX_FALSE_POSITIVE_RATE) -> float:
    """Specificity-first operating point: the lowest threshold at which at most ``max_fpr`` of the real vertebrae
    without fracture (:func:`budget_negatives`: checked labels and automatic segments) have p >= it (p: held-out
    probabilities; phantoms do not count).

    The threshold lies midway between the highest negative allowed below it and the next higher probability of any
    row, so it separates the held-out predictions exactly as that count does. 0.5 when there is no real negative.
    """
    neg = np.sort(p[budget_negatives(s)])[::-1]
    if not neg.size:
        return 0.5
    allowed = int(math.floor(max_fpr * neg.size + 1e-9))
    if allowed >= neg.size:
        return float(neg[-1])
    below = float(neg[allowed])  # the highest negative that must fall below the threshold
    above = p[p > below]
    return float((below + above.min()) / 2) if above.size else float(np.nextafter(below, 1.0))
