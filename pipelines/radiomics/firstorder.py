"""pyradiomics' first-order features of several derived images at once.

pyradiomics' ``RadiomicsFirstOrder`` getters already take a batch axis (its voxel-based
mode): here that axis holds the derived images of one task, which share the ROI and so
its voxel count. Each getter runs once for all of them, and the five order statistics
(percentiles, median) come from one partition instead of a Python loop per image; the
energy sum is shared and the NaN-masked copies of the mean deviations are masked sums;
the formulas are pyradiomics' own.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray
from radiomics.firstorder import RadiomicsFirstOrder

_PERCENTILES = (10.0, 25.0, 50.0, 75.0, 90.0)


def first_order(
    values: Sequence[NDArray[Any]],
    counts: Sequence[NDArray[np.int_]],
    shift: float,
    spacing: tuple[float, ...],
    names: Sequence[str] | None,
) -> list[dict[str, float]]:
    """First-order features of each image: ``values`` its ROI voxels (same count in each),
    ``counts`` the voxels per grey level present after binning; ``names`` None: all
    non-deprecated features, as pyradiomics enables them."""
    target = np.stack([np.asarray(v, dtype=np.float64) for v in values])
    width = max(len(c) for c in counts)
    p_i = np.zeros((len(counts), width))
    for row, c in zip(p_i, counts, strict=True):
        row[: len(c)] = c / float(np.sum(c))  # pyradiomics' p_i, zeros past the levels present
    batch = _Batch(target, p_i, shift, spacing)
    enabled = names or [n for n, deprecated in _feature_names().items() if not deprecated]
    out: list[dict[str, float]] = [{} for _ in values]
    for feature in enabled:
        try:
            result = np.broadcast_to(getattr(batch, f"get{feature}FeatureValue")(), len(out))
        except Exception:  # pyradiomics logs a failed feature and reports NaN
            logging.getLogger("radiomics.firstorder").exception("FAILED: %s", feature)
            result = np.full(len(out), np.nan)
        for features, value in zip(out, result, strict=True):
            features[feature] = float(value)
    return out


@functools.cache
def _feature_names() -> dict[str, bool]:
    """Feature name -> deprecated, as pyradiomics lists them."""
    return dict(RadiomicsFirstOrder.getFeatureNames())


class _Batch(RadiomicsFirstOrder):
    """pyradiomics' first-order getters on prepared arrays (no image, no mask)."""

    def __init__(
        self, target: NDArray[np.float64], p_i: NDArray[np.float64], shift: float, spacing: Any
    ) -> None:
        self.targetVoxelArray = target
        self.coefficients = {"p_i": p_i}
        self.voxelArrayShift = shift
        self.pixelSpacing = spacing
        self.logger = logging.getLogger("radiomics.firstorder")

    @functools.cached_property
    def _order(self) -> dict[float, NDArray[np.float64]]:
        """The percentiles and the median of each image (no NaN: the ROI's voxels only),
        from one partition (the median as numpy's 50th percentile: for an even count the
        midpoint of the middle two, within a unit in the last place of ``numpy.median``)."""
        found = np.percentile(self.targetVoxelArray, _PERCENTILES, axis=1)
        return dict(zip(_PERCENTILES, found, strict=True))

    @functools.cached_property
    def _deviations(self) -> NDArray[np.float64]:
        """Each voxel's value less its image's mean (pyradiomics' ``_moment`` computes it
        for every moment)."""
        target = self.targetVoxelArray
        return np.asarray(target - np.mean(target, axis=1, keepdims=True), dtype=np.float64)

    @functools.cached_property
    def _squares(self) -> NDArray[np.float64]:
        return np.asarray(self._deviations * self._deviations, dtype=np.float64)

    def _moment(self, a: NDArray[np.float64], moment: int = 1) -> Any:
        """pyradiomics' central moment of each image (``a`` is always the ROI's voxels),
        by products (``numpy.power`` calls ``pow`` per voxel: same value to the last bits)."""
        if moment == 1:
            return np.float64(0.0)
        if moment == 2:
            power = self._squares
        elif moment == 3:
            power = self._squares * self._deviations
        elif moment == 4:
            power = self._squares * self._squares
        else:
            power = self._deviations**moment
        return np.mean(power, axis=1)

    @functools.cached_property
    def _energy(self) -> NDArray[np.float64]:
        """pyradiomics' energy sum, shared by energy, total energy and RMS."""
        shifted = self.targetVoxelArray + self.voxelArrayShift
        return np.asarray(np.sum(shifted**2, 1), dtype=np.float64)

    def getEnergyFeatureValue(self) -> NDArray[np.float64]:
        return self._energy

    def getTotalEnergyFeatureValue(self) -> NDArray[np.float64]:
        return np.asarray(self._energy * np.multiply.reduce(self.pixelSpacing), dtype=np.float64)

    def getRootMeanSquaredFeatureValue(self) -> NDArray[np.float64]:
        return np.asarray(np.sqrt(self._energy / float(self.targetVoxelArray.shape[1])))

    def getMeanAbsoluteDeviationFeatureValue(self) -> NDArray[np.float64]:
        return np.asarray(np.mean(np.absolute(self._deviations), 1), dtype=np.float64)

    def getRobustMeanAbsoluteDeviationFeatureValue(self) -> NDArray[np.float64]:
        """pyradiomics' rMAD (voxels within the 10th-90th percentiles), masked sums in
        place of its NaN copies: the same sums, term for term."""
        values = self.targetVoxelArray
        inside = (values - self._order[10.0][:, None] >= 0) & (
            values - self._order[90.0][:, None] <= 0
        )
        count = np.sum(inside, 1, keepdims=True)
        mean = np.sum(np.where(inside, values, 0.0), 1, keepdims=True) / count
        spread = np.where(inside, np.absolute(values - mean), 0.0)
        return np.asarray(np.sum(spread, 1) / count[:, 0], dtype=np.float64)

    def get10PercentileFeatureValue(self) -> NDArray[np.float64]:
        return self._order[10.0]

    def get90PercentileFeatureValue(self) -> NDArray[np.float64]:
        return self._order[90.0]

    def getMedianFeatureValue(self) -> NDArray[np.float64]:
        return self._order[50.0]

    def getInterquartileRangeFeatureValue(self) -> NDArray[np.float64]:
        return self._order[75.0] - self._order[25.0]
