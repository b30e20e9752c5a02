"""Intraclass correlation (Shrout & Fleiss 1979) and a filter keeping reproducible features.

The studies keep radiomic features whose inter-reader ICC is at least 0.75 (Jiang et al.
2025, Pei et al. 2025) or above 0.80 (the IPH-vs-contrast study). Reliability is a
property of a feature, measured on a reliability subset (e.g. 40 cases segmented twice),
not on the training rows; so :class:`ICCFilter` takes the readers' matrices (or a
precomputed ICC vector) at construction, and ``fit(X, y)`` only checks that ``X`` has the
same features. That keeps the filter valid inside cross-validation, where ``X`` is a fold
whose rows no longer line up with the readers' cases.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray
from sklearn.base import BaseEstimator
from sklearn.feature_selection import SelectorMixin
from sklearn.utils.validation import check_array, check_is_fitted, validate_data


class ICCForm(StrEnum):
    """ICC forms of Shrout & Fleiss (1979), named ICC(model, raters averaged).

    ``ICC(1,1)``: one-way random, single rater. ``ICC(2,1)``: two-way random, absolute
    agreement, single rater. ``ICC(3,1)``: two-way mixed, consistency, single rater.
    The ``k`` forms are the reliability of the mean of the k raters.
    """

    ICC1_1 = "ICC(1,1)"
    ICC2_1 = "ICC(2,1)"
    ICC3_1 = "ICC(3,1)"
    ICC1_K = "ICC(1,k)"
    ICC2_K = "ICC(2,k)"
    ICC3_K = "ICC(3,k)"


def _stack_ratings(ratings: Sequence[ArrayLike]) -> NDArray[np.float64]:
    """Stack k rater matrices of shape (n_cases, n_features) into (k, n, p), validated."""
    if isinstance(ratings, np.ndarray) and ratings.ndim == 3:
        ratings = list(ratings)
    if len(ratings) < 2:
        raise ValueError(f"ICC needs the ratings of at least 2 readers, got {len(ratings)}")
    mats = [check_array(r, dtype=np.float64, ensure_min_samples=2) for r in ratings]
    shapes = {m.shape for m in mats}
    if len(shapes) != 1:
        raise ValueError(
            "every reader's matrix must have the same shape (n_cases, n_features); "
            f"got {sorted(shapes)}"
        )
    return np.stack(mats)


def icc(ratings: Sequence[ArrayLike], form: str | ICCForm = ICCForm.ICC2_1) -> NDArray[np.float64]:
    """ICC of every feature from k readers' matrices, each of shape (n_cases, n_features).

    Mean squares of the two-way ANOVA without replication (cases x readers), per
    feature: BMS between cases, WMS within cases, JMS between readers, EMS residual.
    Shrout & Fleiss (1979), Table 3:

    - ICC(1,1) = (BMS - WMS) / (BMS + (k-1) WMS)
    - ICC(2,1) = (BMS - EMS) / (BMS + (k-1) EMS + k (JMS - EMS) / n)
    - ICC(3,1) = (BMS - EMS) / (BMS + (k-1) EMS)
    - ICC(1,k) = (BMS - WMS) / BMS; ICC(2,k) = (BMS - EMS) / (BMS + (JMS - EMS) / n);
      ICC(3,k) = (BMS - EMS) / BMS.

    A feature constant across all cases and readers has an undefined ICC, returned as NaN.
    """
    if form not in set(ICCForm):
        raise ValueError(f"form must be one of {[f.value for f in ICCForm]}, not {form!r}")
    kind = ICCForm(form)
    r = _stack_ratings(ratings)
    k, n, _ = r.shape
    grand = r.mean(axis=(0, 1))
    ss_total = ((r - grand) ** 2).sum(axis=(0, 1))
    ss_cases = k * ((r.mean(axis=0) - grand) ** 2).sum(axis=0)
    ss_readers = n * ((r.mean(axis=1) - grand) ** 2).sum(axis=0)
    bms = ss_cases / (n - 1)
    wms = (ss_total - ss_cases) / (n * (k - 1))
    jms = ss_readers / (k - 1)
    ems = (ss_total - ss_cases - ss_readers) / ((n - 1) * (k - 1))
    formulas = {
        ICCForm.ICC1_1: lambda: (bms - wms, bms + (k - 1) * wms),
        ICCForm.ICC2_1: lambda: (bms - ems, bms + (k - 1) * ems + k * (jms - ems) / n),
        ICCForm.ICC3_1: lambda: (bms - ems, bms + (k - 1) * ems),
        ICCForm.ICC1_K: lambda: (bms - wms, bms),
        ICCForm.ICC2_K: lambda: (bms - ems, bms + (jms - ems) / n),
        ICCForm.ICC3_K: lambda: (bms - ems, bms),
    }
    num, den = formulas[kind]()
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(den != 0, num / np.where(den != 0, den, 1.0), np.nan)
    return np.asarray(out, dtype=np.float64)


class ICCFilter(SelectorMixin, BaseEstimator):
    """Keep the features whose inter- (or intra-) reader ICC is at least ``threshold``.

    Parameters
    ----------
    ratings : sequence of k >= 2 array-likes of shape (n_cases, n_features), optional
        The same features extracted from k segmentations of the same reliability cases
        (reader 1, reader 2, ...), rows in the same case order. Columns must be the
        columns of the ``X`` the filter is fitted on; when both carry feature names
        (pandas), the names must match.
    icc_values : array-like of shape (n_features,), optional
        Precomputed ICCs instead of ``ratings`` (exactly one of the two). Use it to
        combine several reliability studies, e.g. the IPH-vs-contrast study's intra- and
        inter-observer ICCs: ``np.minimum(icc(intra), icc(inter))``.
    threshold : float, default 0.75
        Features with ICC >= threshold are kept (0.75 in Jiang et al. and Pei et al.,
        0.80 in the IPH-vs-contrast study). NaN ICCs (constant features) are dropped.
    form : str or ICCForm, default "ICC(2,1)"
        Two-way random effects, absolute agreement, single reader: readers are a sample
        of possible readers and a systematic offset between them counts as disagreement
        (Koo & Li 2016's recommendation for inter-reader reliability). "ICC(3,1)"
        (consistency) ignores such offsets; any :class:`ICCForm` is accepted.

    Attributes
    ----------
    icc_ : ndarray of shape (n_features,)
        The ICC of every input feature.
    """

    def __init__(
        self,
        ratings: Sequence[ArrayLike] | None = None,
        *,
        icc_values: ArrayLike | None = None,
        threshold: float = 0.75,
        form: str | ICCForm = "ICC(2,1)",
    ) -> None:
        self.ratings = ratings
        self.icc_values = icc_values
        self.threshold = threshold
        self.form = form

    def fit(self, X: ArrayLike, y: ArrayLike | None = None) -> ICCFilter:
        """Compute (or take) the ICC of every feature; ``X`` only fixes the feature set."""
        validate_data(self, X)
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)):
            raise ValueError(f"threshold must be a number, not {self.threshold!r}")
        if float(self.threshold) > 1.0:
            raise ValueError(f"threshold must be <= 1 (an ICC), not {self.threshold}")
        if (self.ratings is None) == (self.icc_values is None):
            raise ValueError("give exactly one of ratings (readers' matrices) or icc_values")
        if self.ratings is not None:
            self._check_names(self.ratings)
            values = icc(self.ratings, self.form)
        else:
            values = np.asarray(self.icc_values, dtype=np.float64)
            if values.ndim != 1:
                raise ValueError(f"icc_values must be 1-D, got shape {values.shape}")
        if values.shape[0] != self.n_features_in_:
            raise ValueError(
                f"the ICCs cover {values.shape[0]} features but X has {self.n_features_in_}"
            )
        self.icc_ = values
        return self

    def _check_names(self, ratings: Sequence[Any]) -> None:
        """Refuse readers' matrices whose column names differ from the fitted X's."""
        fitted = getattr(self, "feature_names_in_", None)
        for i, r in enumerate(ratings):
            columns = getattr(r, "columns", None)
            if fitted is not None and columns is not None and list(columns) != list(fitted):
                raise ValueError(f"reader {i + 1}'s columns differ from the columns of X")

    def _get_support_mask(self) -> NDArray[np.bool_]:
        check_is_fitted(self, "icc_")
        with np.errstate(invalid="ignore"):
            return np.asarray(self.icc_ >= self.threshold, dtype=bool)
