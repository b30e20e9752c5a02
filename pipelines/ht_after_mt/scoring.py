"""Which lesion the HT-after-thrombectomy model scores, and why: a pure rule on the
segmenter's labelled regions.

The configured segmenter (``pipelines.contract.Segmenter``) labels candidate lesions on
the volume grid, largest first. Calcified foci (choroid plexus, pineal, basal ganglia,
falx, vessel walls: dense cores above the calcification threshold of the threshold
baseline) are found apart from the lesions and are never scored: a region the segmenter
returns that lies mostly on calcified voxels (``CALCIFIED_SHARE``) is taken for a
calcification the segmenter mislabelled and is skipped. A region that no acquired frame
crosses cannot be shown on the images and is skipped too. The scored lesion is the
largest region left; :func:`scored_reason` says so in one line, e.g. "largest
hyperdense region (12.3 mL) of 3 found by hyperdense_unet".

Every output of the pipeline states the choice: the SEG holds the scored lesion as its
own segment (``Scored lesion ...``), the other regions and the calcifications as
segments of their own, the SC and SR name the scored region and this reason, and with no
region left they say :data:`NO_LESION`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from pipelines.series import label_dtype

NO_LESION = "no lesion: no risk computed"
"""What the SC and SR say when the segmenter found no lesion to score."""

CALCIFIED_SHARE = 0.5
"""A region with at least this share of its voxels calcified is a calcification."""


@dataclass(frozen=True)
class LesionChoice:
    """The scored region among the segmenter's, and what was left out."""

    label: int | None  # grid label of the scored region; None: nothing to score
    volume_ml: float  # grid volume of the scored region (0 without one)
    regions_found: int  # regions the segmenter returned
    calcified: tuple[int, ...]  # labels skipped as calcification
    off_frames: tuple[int, ...]  # labels no acquired frame crosses


def region_volumes_ml(
    labels: NDArray[np.integer], count: int, voxel_ml: float
) -> NDArray[np.float64]:
    """Grid volume (mL) of regions ``1..count``, index k - 1 for label k."""
    sizes = np.bincount(labels.ravel(), minlength=count + 1)[1 : count + 1]
    return sizes.astype(np.float64) * voxel_ml


def calcified_shares(
    labels: NDArray[np.integer], count: int, calcified: NDArray[np.bool_]
) -> NDArray[np.float64]:
    """Share of each region's voxels (labels ``1..count``) that are calcified."""
    if calcified.shape != labels.shape:
        raise ValueError(f"calcified mask {calcified.shape} is not the labels' {labels.shape}")
    sizes = np.bincount(labels.ravel(), minlength=count + 1)[1 : count + 1]
    dense = np.bincount(labels[calcified].ravel(), minlength=count + 1)[1 : count + 1]
    return np.divide(dense, sizes, out=np.zeros(count), where=sizes > 0)


def choose_lesion(
    labels: NDArray[np.integer],
    count: int,
    calcified: NDArray[np.bool_],
    on_frames: Sequence[bool],
    voxel_ml: float,
) -> LesionChoice:
    """The largest region that is neither mostly calcified nor off the acquired frames.

    ``labels``/``count``: the segmenter's regions (1..count, largest first);
    ``calcified``: calcified voxels on the same grid; ``on_frames[k - 1]``: whether an
    acquired frame crosses region k.
    """
    if len(on_frames) != count:
        raise ValueError(f"on_frames has {len(on_frames)} entries for {count} regions")
    volumes = region_volumes_ml(labels, count, voxel_ml)
    shares = calcified_shares(labels, count, calcified)
    dense = tuple(k + 1 for k in range(count) if shares[k] >= CALCIFIED_SHARE)
    off = tuple(k + 1 for k in range(count) if not on_frames[k] and k + 1 not in dense)
    candidates = [k + 1 for k in range(count) if k + 1 not in dense and k + 1 not in off]
    if not candidates:
        return LesionChoice(None, 0.0, count, dense, off)
    best = max(candidates, key=lambda k: (volumes[k - 1], -k))
    return LesionChoice(best, float(volumes[best - 1]), count, dense, off)


def scored_reason(
    choice: LesionChoice, segmenter: str, n_calcifications: int, measured_ml: float
) -> str:
    """One line: which region was scored and why (or :data:`NO_LESION` and why), with the
    scored region's ``measured_ml``: its volume on the acquired frames, as SEG, SC and SR
    measure it (the choice's grid volume differs by resampling)."""
    found = f"{choice.regions_found} found by {segmenter}"
    dense = (
        f"; {n_calcifications} calcification(s) reported apart, never scored"
        if n_calcifications
        else ""
    )
    skipped = (
        f"; {len(choice.calcified)} mostly calcified region(s) skipped" if choice.calcified else ""
    )
    if choice.label is None:
        return f"{NO_LESION} (no hyperdense lesion among {found}{skipped}{dense})"
    return f"largest hyperdense region ({measured_ml:.1f} mL) of {found}{skipped}{dense}"


def relabel_without(
    labels: NDArray[np.integer], count: int, removed: Sequence[int]
) -> tuple[NDArray[np.unsignedinteger], int]:
    """``labels`` with the regions ``removed`` cleared and the rest renumbered 1..n in
    their order (largest first stays largest first), in the smallest type holding n."""
    kept = [k for k in range(1, count + 1) if k not in set(removed)]
    lookup = np.zeros(count + 1, dtype=label_dtype(len(kept)))
    lookup[kept] = np.arange(1, len(kept) + 1)
    return lookup[labels], len(kept)
