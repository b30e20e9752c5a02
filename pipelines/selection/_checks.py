"""Validation shared by the selectors: binary outcomes, probabilities, counts."""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray
from sklearn.utils.multiclass import type_of_target


def binary_target(y: Any, selector: str) -> tuple[NDArray[np.bool_], NDArray[Any]]:
    """Return ``y == classes[1]`` and the two sorted class labels of a binary outcome.

    Raises ``ValueError`` naming ``selector`` when ``y`` does not hold exactly two classes.
    """
    kind = type_of_target(y)
    classes = np.unique(y)
    if kind != "binary" or classes.size != 2:
        raise ValueError(
            f"{selector} needs a binary outcome with exactly 2 classes; "
            f"got target type {kind!r} with {classes.size} class(es)"
        )
    return np.asarray(y) == classes[1], classes


def check_open_unit(value: float, name: str) -> None:
    """Raise ``ValueError`` unless ``0 < value < 1`` (a significance level, a fraction)."""
    if not isinstance(value, (int, float)) or not 0.0 < float(value) < 1.0:
        raise ValueError(f"{name} must be a number strictly between 0 and 1, not {value!r}")


def check_positive_int(value: int, name: str) -> None:
    """Raise ``ValueError`` unless ``value`` is an integer >= 1 (bools refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, not {value!r}")


def check_choice(value: str, name: str, choices: tuple[str, ...]) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, not {value!r}")
