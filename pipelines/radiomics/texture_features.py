"""pyradiomics 3.0.1's texture features (GLCM, GLRLM, GLSZM, GLDM, NGTDM) of several
images at once, from their matrices (``matrices.Matrices``), with its formulas.

pyradiomics computes each class on one image with a Python object per class and a
numpy call per feature and angle set. Here the matrices of all images of a task are
stacked on a batch axis (zero-padded to the largest grey level, so that row ``g - 1``
holds grey level ``g`` in every image) and each feature is one vectorised expression
over images and angles. The formulas, the epsilon (``numpy.spacing(1)``), the mean over
angles (``nanmean``; an angle without pairs is NaN, which pyradiomics deletes) and the
guards against empty sums are pyradiomics' own. pyradiomics deletes grey levels absent
from the ROI and empty run, zone and dependence columns; their entries are zeros, which
add nothing to its sums, so they are kept (columns: only those non-empty in some image).
The one feature that depends on the matrix size, GLCM's MCC (eigenvalues), is computed
per image on pyradiomics' compacted matrix. ``batchable`` says which settings this is.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray
from radiomics import getFeatureClasses

from pipelines.radiomics.matrices import ANGLES, Matrices, covers

Array = NDArray[np.float64]
EPS = float(np.spacing(1))
CLASSES = ("glcm", "glrlm", "glszm", "gldm", "ngtdm")
BATCH_CELLS = 2_000_000  # GLCM cells per batch (16 MB): fine binnings run in small batches


def batchable(class_name: str, options: dict[str, Any], shape: tuple[int, ...]) -> bool:
    """Whether ``class_features`` gives pyradiomics' values for this class and settings
    (else pyradiomics' own class must run)."""
    return (
        class_name in CLASSES
        and covers(options, shape)
        and options.get("weightingNorm") is None
        and (class_name != "glcm" or bool(options.get("symmetricalGLCM", True)))
    )


def degenerate(shared: Matrices) -> bool:
    """Whether the ROI has no two neighbouring voxels (every angle empty): pyradiomics'
    deletions leave empty arrays there, which its own classes handle."""
    return not shared.get("glcm").any()


def feature_names(class_name: str, names: Sequence[str] | None) -> list[str] | None:
    """The features computed for ``names`` (None: all non-deprecated, as pyradiomics
    enables them); None if one is deprecated or unknown (pyradiomics' class handles it)."""
    available = _available(class_name)
    if names is None:
        return [n for n, deprecated in available.items() if not deprecated]
    if all(available.get(n) is False for n in names):
        return list(names)
    return None


@functools.cache
def _available(class_name: str) -> dict[str, bool]:
    return dict(getFeatureClasses()[class_name].getFeatureNames())


def class_features(
    class_name: str,
    images: Sequence[Matrices],
    levels: Sequence[NDArray[np.int_]],
    names: list[str],
) -> list[dict[str, float]]:
    """Features ``names`` of class ``class_name`` for each image (its matrices and the
    grey levels present in its ROI), named as pyradiomics names them."""
    compute: Callable[..., dict[str, Array]] = _COMPUTE[class_name]
    out: list[dict[str, float]] = [{} for _ in images]
    for group in _by_size(images):  # images padded to the largest grey level of a group
        with np.errstate(all="ignore"):  # pyradiomics' NaN and guarded divisions, silently
            values = compute([images[k] for k in group], [levels[k] for k in group], names)
        for b, k in enumerate(group):
            out[k] = {n: float(values[n][b]) for n in names}
    return out


def _by_size(images: Sequence[Matrices]) -> list[list[int]]:
    """The images' indices in groups whose largest grey levels are within a factor of 2,
    each group's padded GLCMs within ``BATCH_CELLS``."""
    groups: dict[int, list[int]] = {}
    for k, image in enumerate(images):
        groups.setdefault(int(np.ceil(np.log2(max(image.ng, 1)))), []).append(k)
    out = []
    for members in groups.values():
        largest = max(images[k].ng for k in members)
        size = max(1, BATCH_CELLS // (largest * largest * len(ANGLES)))
        out += [members[i : i + size] for i in range(0, len(members), size)]
    return out


def _stack(matrices: Sequence[Array]) -> Array:
    """Matrices (level x ...) zero-padded to one shape, stacked on a batch axis."""
    shape = tuple(max(m.shape[k] for m in matrices) for k in range(matrices[0].ndim))
    out = np.zeros((len(matrices), *shape))
    for b, m in enumerate(matrices):
        index: tuple[int | slice, ...] = (b, *(slice(0, n) for n in m.shape))
        out[index] = m
    return out


def _glcm(
    images: Sequence[Matrices], levels: Sequence[NDArray[np.int_]], names: list[str]
) -> dict[str, Array]:
    """``RadiomicsGLCM``: symmetrical, distance 1, no weighting."""
    p = _stack([m.get("glcm")[0] for m in images])  # (images, Ng, Ng, angles)
    p += p.transpose(0, 2, 1, 3)
    total = p.sum((1, 2))
    total[total == 0] = np.nan  # an empty angle (pyradiomics deletes it)
    p /= total[:, None, None, :]
    ng = p.shape[1]
    grey = np.arange(1, ng + 1, dtype=np.float64)
    i, j = grey[None, :, None, None], grey[None, None, :, None]
    k_sum = np.arange(2, 2 * ng + 1, dtype=np.float64)
    k_diff = np.arange(0, ng, dtype=np.float64)
    cells = p.reshape(len(images), ng * ng, -1)
    at_sum = (np.add.outer(grey, grey).ravel()[None, :] == k_sum[:, None]).astype(np.float64)
    at_diff = (np.abs(np.subtract.outer(grey, grey)).ravel()[None, :] == k_diff[:, None]).astype(
        np.float64
    )
    px, py = p.sum(2, keepdims=True), p.sum(1, keepdims=True)
    ux, uy = np.sum(i * p, (1, 2), keepdims=True), np.sum(j * p, (1, 2), keepdims=True)
    p_sum, p_diff = np.matmul(at_sum, cells), np.matmul(at_diff, cells)  # (images, k, angles)
    hxy = -1 * np.sum(p * np.log2(p + EPS), (1, 2))
    top = np.array([int(np.max(g)) for g in levels], dtype=np.float64)[:, None, None]
    kd = k_diff[None, :, None]
    ks = k_sum[None, :, None]

    centred: list[Array] = []  # (i + j) - ux - uy, made once for the three cluster features

    def cluster(power: int) -> Array:
        if not centred:
            centred.append((i + j) - ux - uy)
        d = centred[0]
        squared = d * d  # products, not ``**``: numpy's power runs pow() for 3 and 4
        term = squared if power == 2 else squared * d if power == 3 else squared * squared
        return np.sum(p * term, (1, 2))

    def correlation() -> Array:
        sigx = np.sum(p * (i - ux) ** 2, (1, 2), keepdims=True) ** 0.5
        sigy = np.sum(p * (j - uy) ** 2, (1, 2), keepdims=True) ** 0.5
        corm = np.sum(p * (i - ux) * (j - uy), (1, 2), keepdims=True)
        corr = corm / (sigx * sigy + EPS)
        corr[sigx * sigy == 0] = 1
        return corr[:, 0, 0, :]

    def imc1() -> Array:
        hx = -1 * np.sum(px * np.log2(px + EPS), (1, 2))
        hy = -1 * np.sum(py * np.log2(py + EPS), (1, 2))
        hxy1 = -1 * np.sum(p * np.log2(px * py + EPS), (1, 2))
        div = np.fmax(hx, hy)
        out = hxy - hxy1
        out[div != 0] /= div[div != 0]
        out[div == 0] = 0
        return out

    def imc2() -> Array:
        hxy2 = -1 * np.sum(px * py * np.log2(px * py + EPS), (1, 2))
        out = (1 - np.e ** (-2 * (hxy2 - hxy))) ** 0.5
        out[hxy2 == hxy] = 0
        return out

    def difference_variance() -> Array:
        average = np.sum(kd * p_diff, 1, keepdims=True)
        return np.sum(p_diff * (kd - average) ** 2, 1)

    per_angle: dict[str, Callable[[], Array]] = {
        "Autocorrelation": lambda: np.sum(p * (i * j), (1, 2)),
        "JointAverage": lambda: ux[:, 0, 0, :],
        "ClusterProminence": lambda: cluster(4),
        "ClusterShade": lambda: cluster(3),
        "ClusterTendency": lambda: cluster(2),
        "Contrast": lambda: np.sum(p * np.abs(i - j) ** 2, (1, 2)),
        "Correlation": correlation,
        "DifferenceAverage": lambda: np.sum(kd * p_diff, 1),
        "DifferenceEntropy": lambda: -1 * np.sum(p_diff * np.log2(p_diff + EPS), 1),
        "DifferenceVariance": difference_variance,
        "JointEnergy": lambda: np.sum(p**2, (1, 2)),
        "JointEntropy": lambda: hxy,
        "Imc1": imc1,
        "Imc2": imc2,
        "Idm": lambda: np.sum(p_diff / (1 + kd**2), 1),
        "Idmn": lambda: np.sum(p_diff / (1 + kd**2 / top**2), 1),
        "Id": lambda: np.sum(p_diff / (1 + kd), 1),
        "Idn": lambda: np.sum(p_diff / (1 + kd / top), 1),
        "InverseVariance": lambda: np.sum(p_diff[:, 1:, :] / kd[:, 1:, :] ** 2, 1),
        "MaximumProbability": lambda: np.amax(p, (1, 2)),
        "SumAverage": lambda: np.sum(ks * p_sum, 1),
        "SumEntropy": lambda: -1 * np.sum(p_sum * np.log2(p_sum + EPS), 1),
        "SumSquares": lambda: np.sum(p * (i - ux) ** 2, (1, 2)),
    }
    out = {n: np.nanmean(per_angle[n](), 1) for n in names if n != "MCC"}
    if "MCC" in names:
        out["MCC"] = np.array([_mcc(p[b], levels[b]) for b in range(len(images))])
    return out


def _mcc(p: Array, levels: NDArray[np.int_]) -> float:
    """``getMCCFeatureValue`` on pyradiomics' matrix: levels present, non-empty angles."""
    keep = levels - 1
    p = p[np.ix_(keep, keep)][..., ~np.isnan(p[0, 0])][None]
    px, py = p.sum(2, keepdims=True), p.sum(1, keepdims=True)
    q = (
        p[:, :, None, 0, :]
        * p[:, None, :, 0, :]
        / (px[:, :, None, 0, :] * py[:, None, :, 0, :] + EPS)
    )
    for gl in range(1, p.shape[1]):
        q += (
            p[:, :, None, gl, :]
            * p[:, None, :, gl, :]
            / (px[:, :, None, 0, :] * py[:, None, :, gl, :] + EPS)
        )
    try:
        eigen = np.linalg.eigvals(q.transpose((0, 3, 1, 2)))
    except np.linalg.LinAlgError:  # pyradiomics logs a failed feature and reports NaN
        logging.getLogger("radiomics.glcm").exception("FAILED: MCC")
        return float("nan")
    eigen.sort()
    if eigen.shape[2] < 2:
        return 1.0
    return float(np.nanmean(np.sqrt(eigen[:, :, -2]), 1).real[0])


# Features of a (grey level x size) matrix: pyradiomics' GLRLM, GLSZM and GLDM share them
# under their own names (key: this module's name for the formula).
_SIZE_NAMES = {
    "glrlm": {
        "small": "ShortRunEmphasis",
        "large": "LongRunEmphasis",
        "gln": "GrayLevelNonUniformity",
        "glnn": "GrayLevelNonUniformityNormalized",
        "snu": "RunLengthNonUniformity",
        "snun": "RunLengthNonUniformityNormalized",
        "percentage": "RunPercentage",
        "glv": "GrayLevelVariance",
        "sv": "RunVariance",
        "entropy": "RunEntropy",
        "low": "LowGrayLevelRunEmphasis",
        "high": "HighGrayLevelRunEmphasis",
        "small_low": "ShortRunLowGrayLevelEmphasis",
        "small_high": "ShortRunHighGrayLevelEmphasis",
        "large_low": "LongRunLowGrayLevelEmphasis",
        "large_high": "LongRunHighGrayLevelEmphasis",
    },
    "glszm": {
        "small": "SmallAreaEmphasis",
        "large": "LargeAreaEmphasis",
        "gln": "GrayLevelNonUniformity",
        "glnn": "GrayLevelNonUniformityNormalized",
        "snu": "SizeZoneNonUniformity",
        "snun": "SizeZoneNonUniformityNormalized",
        "percentage": "ZonePercentage",
        "glv": "GrayLevelVariance",
        "sv": "ZoneVariance",
        "entropy": "ZoneEntropy",
        "low": "LowGrayLevelZoneEmphasis",
        "high": "HighGrayLevelZoneEmphasis",
        "small_low": "SmallAreaLowGrayLevelEmphasis",
        "small_high": "SmallAreaHighGrayLevelEmphasis",
        "large_low": "LargeAreaLowGrayLevelEmphasis",
        "large_high": "LargeAreaHighGrayLevelEmphasis",
    },
    "gldm": {
        "small": "SmallDependenceEmphasis",
        "large": "LargeDependenceEmphasis",
        "gln": "GrayLevelNonUniformity",
        "snu": "DependenceNonUniformity",
        "snun": "DependenceNonUniformityNormalized",
        "glv": "GrayLevelVariance",
        "sv": "DependenceVariance",
        "entropy": "DependenceEntropy",
        "low": "LowGrayLevelEmphasis",
        "high": "HighGrayLevelEmphasis",
        "small_low": "SmallDependenceLowGrayLevelEmphasis",
        "small_high": "SmallDependenceHighGrayLevelEmphasis",
        "large_low": "LargeDependenceLowGrayLevelEmphasis",
        "large_high": "LargeDependenceHighGrayLevelEmphasis",
    },
}


def _size_class(class_name: str) -> Callable[..., dict[str, Array]]:
    """GLRLM (per angle, ``nanmean`` over angles), GLSZM or GLDM (one matrix each)."""

    def compute(
        images: Sequence[Matrices], _levels: Sequence[NDArray[np.int_]], names: list[str]
    ) -> dict[str, Array]:
        raw = [m.get(class_name)[0] for m in images]
        if class_name != "glrlm":
            raw = [r[:, :, None] for r in raw]
        used = np.flatnonzero(np.any([_columns(r, max(x.shape[1] for x in raw)) for r in raw], 0))
        p = _stack([r[:, used[used < r.shape[1]], :] for r in raw])  # non-empty columns
        values = _size_features(p, used.astype(np.float64) + 1, class_name)
        wanted = {name: key for key, name in _SIZE_NAMES[class_name].items()}
        return {n: np.nanmean(values[wanted[n]](), 1) for n in names}

    return compute


def _columns(matrix: Array, width: int) -> NDArray[np.bool_]:
    """Which of ``width`` columns of ``matrix`` (levels x columns x angles) hold counts."""
    out = np.zeros(width, dtype=bool)
    out[: matrix.shape[1]] = matrix.any(axis=(0, 2))
    return out


def _size_features(p: Array, j_values: Array, class_name: str) -> dict[str, Callable[[], Array]]:
    """Each formula of a (images, levels, sizes, angles) count matrix, per image and angle."""
    i = np.arange(1, p.shape[1] + 1, dtype=np.float64)[None, :, None, None]
    j = j_values[None, None, :, None]
    total = p.sum((1, 2))  # (images, angles): runs, zones or voxels
    if class_name == "glrlm":
        total[total == 0] = np.nan  # an empty angle (pyradiomics deletes it)
    else:
        total[total == 0] = 1
    ps, pg = p.sum(1), p.sum(2)  # per size, per level
    jj, ii = j[:, 0], i[:, :, 0]

    def percentage() -> Array:
        voxels = np.sum(ps * jj, 1)
        if class_name == "glszm":
            voxels[voxels == 0] = 1
        return total / voxels

    def variance(q: Array, values: Array) -> Array:
        q = q / total[:, None, :]
        mean = np.sum(q * values, 1, keepdims=True)
        return np.sum(q * (values - mean) ** 2, 1)

    def entropy() -> Array:
        q = p / total[:, None, None, :]
        return -np.sum(q * np.log2(q + EPS), (1, 2))

    return {
        "small": lambda: np.sum(ps / jj**2, 1) / total,
        "large": lambda: np.sum(ps * jj**2, 1) / total,
        "gln": lambda: np.sum(pg**2, 1) / total,
        "glnn": lambda: np.sum(pg**2, 1) / total**2,
        "snu": lambda: np.sum(ps**2, 1) / total,
        "snun": lambda: np.sum(ps**2, 1) / total**2,
        "percentage": percentage,
        "glv": lambda: variance(pg, ii),
        "sv": lambda: variance(ps, jj),
        "entropy": entropy,
        "low": lambda: np.sum(pg / ii**2, 1) / total,
        "high": lambda: np.sum(pg * ii**2, 1) / total,
        "small_low": lambda: np.sum(p / (i**2 * j**2), (1, 2)) / total,
        "small_high": lambda: np.sum(p * i**2 / j**2, (1, 2)) / total,
        "large_low": lambda: np.sum(p * j**2 / i**2, (1, 2)) / total,
        "large_high": lambda: np.sum(p * (j**2 * i**2), (1, 2)) / total,
    }


def _ngtdm(
    images: Sequence[Matrices], _levels: Sequence[NDArray[np.int_]], names: list[str]
) -> dict[str, Array]:
    """``RadiomicsNGTDM``; levels without a counted voxel (pyradiomics deletes them) are
    zero rows, masked where its formulas mask ``p_zero``."""
    m = _stack([x.get("ngtdm")[0] for x in images])  # (images, Ng, 3)
    nvp = np.sum(m[:, :, 0], 1)
    p_i = m[:, :, 0] / nvp[:, None]
    s_i, i = m[:, :, 1], m[:, :, 2]
    ngp = np.sum(m[:, :, 0] > 0, 1)
    zero = p_i == 0
    pair_zero = zero[:, :, None] | zero[:, None, :]
    sum_s = np.sum(s_i, 1)

    def coarseness() -> Array:
        total = np.sum(p_i * s_i, 1)
        total[total != 0] = 1 / total[total != 0]
        total[total == 0] = 1000000.0
        return total

    def contrast() -> Array:
        div = ngp * (ngp - 1)
        pairs = p_i[:, :, None] * p_i[:, None, :] * (i[:, :, None] - i[:, None, :]) ** 2
        out = np.sum(pairs, (1, 2)) * sum_s / nvp
        out[div != 0] /= div[div != 0]
        out[div == 0] = 0
        return out

    def busyness() -> Array:
        i_pi = i * p_i
        absdiff = np.where(pair_zero, 0, np.abs(i_pi[:, :, None] - i_pi[:, None, :])).sum((1, 2))
        out = np.sum(p_i * s_i, 1)
        out[absdiff != 0] = out[absdiff != 0] / absdiff[absdiff != 0]
        out[absdiff == 0] = 0
        return out

    def complexity() -> Array:
        pi_si = p_i * s_i
        numerator = np.where(pair_zero, 0, pi_si[:, :, None] + pi_si[:, None, :])
        divisor = p_i[:, :, None] + p_i[:, None, :]
        divisor[divisor == 0] = 1
        weighted = np.abs(i[:, :, None] - i[:, None, :]) * numerator / divisor
        return np.sum(weighted, (1, 2)) / nvp

    def strength() -> Array:
        pairs = (p_i[:, :, None] + p_i[:, None, :]) * (i[:, :, None] - i[:, None, :]) ** 2
        out = np.where(pair_zero, 0, pairs).sum((1, 2))
        out[sum_s != 0] /= sum_s[sum_s != 0]
        out[sum_s == 0] = 0
        return out

    formulas: dict[str, Callable[[], Array]] = {
        "Coarseness": coarseness,
        "Contrast": contrast,
        "Busyness": busyness,
        "Complexity": complexity,
        "Strength": strength,
    }
    return {n: formulas[n]() for n in names}


_COMPUTE: dict[str, Callable[..., dict[str, Array]]] = {
    "glcm": _glcm,
    "glrlm": _size_class("glrlm"),
    "glszm": _size_class("glszm"),
    "gldm": _size_class("gldm"),
    "ngtdm": _ngtdm,
}
