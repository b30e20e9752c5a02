"""Per-prediction input check: is this case inside the training cohort's distribution?

The training run stores, in the version's manifest (``input_distribution``), each input
feature's training range and the scanners, kernels and slice thicknesses of its
training cases (:meth:`InputDistribution.from_training`). At inference
:meth:`InputDistribution.check` scores a case:

- ``score`` = the fraction of features outside their training range widened by
  :data:`RANGE_MARGIN` of its width on each side (0 = every feature inside, 1 = none);
- header mismatches: a manufacturer or convolution kernel never seen in training, or a
  slice thickness outside the training range (+- :data:`THICKNESS_MARGIN_MM`).

The case is flagged out of distribution when ``score`` exceeds :data:`SCORE_LIMIT` or
any header mismatches. Simple and documented rather than clever: it says *that* and
*where* a case differs, not how much to trust the risk.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset

RANGE_MARGIN = 0.1
SCORE_LIMIT = 0.1
THICKNESS_MARGIN_MM = 0.5
LISTED = 3  # features named in the text
DISTRIBUTION_KEY = "input_distribution"
"""The manifest entry holding :meth:`InputDistribution.to_dict`."""


def header_facts(ds: Dataset) -> dict[str, Any]:
    """Scanner manufacturer, convolution kernel and slice thickness of a case."""
    kernel = ds.get("ConvolutionKernel", "")
    if not isinstance(kernel, str):
        kernel = "\\".join(str(k) for k in kernel)
    thickness = ds.get("SliceThickness")
    return {
        "manufacturer": str(ds.get("Manufacturer", "")).strip(),
        "kernel": str(kernel).strip(),
        "slice_thickness_mm": None if thickness in (None, "") else float(thickness),
    }


@dataclass(frozen=True)
class InputCheck:
    """One case's check against the training distribution."""

    score: float
    outside: tuple[str, ...]  # features outside their training range
    header_issues: tuple[str, ...]

    @property
    def flagged(self) -> bool:
        """Out of distribution (see the module)."""
        return self.score > SCORE_LIMIT or bool(self.header_issues)

    def text(self) -> str:
        """One ASCII line for the SR."""
        verdict = "OUTSIDE the training distribution" if self.flagged else "within training"
        parts = [f"input check: {verdict}; out-of-distribution score {self.score:.2f}"]
        if self.outside:
            more = len(self.outside) - LISTED
            named = ", ".join(self.outside[:LISTED]) + (f" and {more} more" if more > 0 else "")
            parts.append(f"features outside the training range: {named}")
        parts.extend(self.header_issues)
        return "; ".join(parts).encode("ascii", "replace").decode("ascii")


@dataclass(frozen=True)
class InputDistribution:
    """The training cohort's feature ranges and acquisition facts."""

    names: tuple[str, ...]
    low: tuple[float, ...]
    high: tuple[float, ...]
    manufacturers: tuple[str, ...]
    kernels: tuple[str, ...]
    thickness_mm: tuple[float, float] | None

    @classmethod
    def from_training(
        cls, names: Sequence[str], matrix: NDArray[np.float64], headers: Sequence[Mapping[str, Any]]
    ) -> InputDistribution:
        """The distribution of the training rows ``matrix`` (cases x ``names``)."""
        thickness = [h["slice_thickness_mm"] for h in headers if h["slice_thickness_mm"]]
        return cls(
            names=tuple(names),
            low=tuple(float(v) for v in np.nanmin(matrix, axis=0)),
            high=tuple(float(v) for v in np.nanmax(matrix, axis=0)),
            manufacturers=tuple(sorted({str(h["manufacturer"]) for h in headers})),
            kernels=tuple(sorted({str(h["kernel"]) for h in headers})),
            thickness_mm=(min(thickness), max(thickness)) if thickness else None,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (for the manifest)."""
        return {
            "names": list(self.names), "low": list(self.low), "high": list(self.high),
            "manufacturers": list(self.manufacturers), "kernels": list(self.kernels),
            "thickness_mm": None if self.thickness_mm is None else list(self.thickness_mm),
        }  # fmt: skip

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> InputDistribution:
        """Read the manifest form back."""
        thickness = data.get("thickness_mm")
        return cls(
            names=tuple(data["names"]),
            low=tuple(float(v) for v in data["low"]),
            high=tuple(float(v) for v in data["high"]),
            manufacturers=tuple(data.get("manufacturers", ())),
            kernels=tuple(data.get("kernels", ())),
            thickness_mm=None if thickness is None else (float(thickness[0]), float(thickness[1])),
        )

    def check(
        self, names: Sequence[str], row: Sequence[float], header: Mapping[str, Any]
    ) -> InputCheck:
        """Score one case (its feature ``row`` under ``names``, its :func:`header_facts`)."""
        values = dict(zip(names, row, strict=True))
        outside = []
        for name, low, high in zip(self.names, self.low, self.high, strict=True):
            margin = RANGE_MARGIN * (high - low)
            value = values.get(name)
            if (
                value is None
                or not np.isfinite(value)
                or not low - margin <= value <= high + margin
            ):
                outside.append(name)
        issues = []
        if self.manufacturers and header["manufacturer"] not in self.manufacturers:
            issues.append(f"scanner manufacturer {header['manufacturer']!r} not in training")
        if self.kernels and header["kernel"] not in self.kernels:
            issues.append(f"kernel {header['kernel']!r} not in training")
        thickness = header.get("slice_thickness_mm")
        if self.thickness_mm is not None and thickness is not None:
            low, high = self.thickness_mm
            if not low - THICKNESS_MARGIN_MM <= thickness <= high + THICKNESS_MARGIN_MM:
                issues.append(
                    f"slice thickness {thickness:g} mm outside training {low:g}-{high:g} mm"
                )
        score = len(outside) / max(len(self.names), 1)
        return InputCheck(round(score, 4), tuple(outside), tuple(issues))


def manifest_input_check(
    manifest: Mapping[str, Any], names: Sequence[str], row: Sequence[float], ds: Dataset
) -> str | None:
    """The input-check line of one case for a model version whose manifest records its
    training distribution; None for a version trained before the check existed."""
    data = manifest.get(DISTRIBUTION_KEY)
    if not isinstance(data, dict):
        return None
    return InputDistribution.from_dict(data).check(names, row, header_facts(ds)).text()
