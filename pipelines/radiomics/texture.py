"""Features of derived images on the ROI's box: one discretisation per image, first order
batched over the images, the texture classes batched by ``texture_features`` (pyradiomics'
own classes where their settings are not covered)."""

from __future__ import annotations

import functools
import types
from typing import Any

import numpy as np
import SimpleITK as sitk
from numpy.typing import NDArray
from radiomics import getFeatureClasses, imageoperations

from pipelines.radiomics.firstorder import first_order
from pipelines.radiomics.matrices import ANGLES, Matrices, covers
from pipelines.radiomics.texture_features import (
    batchable,
    class_features,
    degenerate,
    feature_names,
)

Derived = tuple[sitk.Image, str, dict[str, Any]]  # image on the ROI's box, name, settings
FIRST_ORDER = "firstorder"


def image_features(
    derived: list[Derived], mask: sitk.Image, features: dict[str, Any]
) -> dict[str, float]:
    """pyradiomics' ``computeFeatures`` for each derived image (all on ``mask``'s grid),
    named ``<image>_<class>_<feature>`` in pyradiomics' order."""
    if not derived:
        return {}
    label = int(derived[0][2].get("label", 1))
    roi = sitk.GetArrayViewFromImage(mask) == label
    arrays = [sitk.GetArrayFromImage(image) for image, _, _ in derived]
    bins = [SharedBins(options) for _, _, options in derived]
    first: list[dict[str, float]] = []
    if FIRST_ORDER in features:
        first = _first_order(derived, arrays, bins, roi, features[FIRST_ORDER])
    by_class = {
        class_name: _class_values(class_name, names, derived, mask, arrays, bins, roi)
        for class_name, names in features.items()
        if not class_name.startswith("shape") and class_name != FIRST_ORDER
    }
    out: dict[str, float] = {}
    for k, (_, name, _) in enumerate(derived):
        for class_name in features:
            if class_name.startswith("shape"):
                continue
            values = first[k] if class_name == FIRST_ORDER else by_class[class_name][k]
            out |= {f"{name}_{class_name}_{feature}": v for feature, v in values.items()}
    return out


def _class_values(
    class_name: str,
    names: list[str] | None,
    derived: list[Derived],
    mask: sitk.Image,
    arrays: list[NDArray[Any]],
    bins: list[SharedBins],
    roi: NDArray[np.bool_],
) -> list[dict[str, float]]:
    """One texture class on every image: batched (``texture_features``) where its
    settings are covered, else pyradiomics' own class, image by image."""
    wanted = feature_names(class_name, names)
    batch = [
        k
        for k, (_, _, options) in enumerate(derived)
        if wanted is not None
        and batchable(class_name, options, roi.shape)
        and not degenerate(bins[k].shared_matrices(arrays[k], roi))
    ]
    out: list[dict[str, float]] = [{} for _ in derived]
    if batch and wanted is not None:
        images = [bins[k].shared_matrices(arrays[k], roi) for k in batch]
        levels = [bins[k].present_levels() for k in batch]
        for k, values in zip(
            batch, class_features(class_name, images, levels, wanted), strict=True
        ):
            out[k] = values
    for k, (image, _, options) in enumerate(derived):
        if k not in batch:
            out[k] = _texture_class(class_name, names, image, mask, options, bins[k])
    return out


def _first_order(
    derived: list[Derived],
    arrays: list[NDArray[Any]],
    bins: list[SharedBins],
    roi: NDArray[np.bool_],
    names: list[str] | None,
) -> list[dict[str, float]]:
    """First-order features of every image, batched over images with the same shift."""
    groups: dict[float, list[int]] = {}
    for k, (_, _, options) in enumerate(derived):
        groups.setdefault(float(options.get("voxelArrayShift", 0)), []).append(k)
    out: list[dict[str, float]] = [{} for _ in derived]
    spacing = derived[0][0].GetSpacing()
    for shift, members in groups.items():
        values = [arrays[k][roi] for k in members]
        counts = [bins[k].counts(arrays[k], roi) for k in members]
        for k, found in zip(
            members, first_order(values, counts, shift, spacing, names), strict=True
        ):
            out[k] = found
    return out


def _texture_class(
    class_name: str,
    names: list[str] | None,
    image: sitk.Image,
    mask: sitk.Image,
    options: dict[str, Any],
    bins: SharedBins,
) -> dict[str, float]:
    """One pyradiomics texture class on one image, with the image's shared discretisation."""
    cls = _sharing(getFeatureClasses()[class_name])
    instance: Any = object.__new__(cls)
    instance.shared_bins = bins
    instance.__init__(image, mask, **options)
    for feature in names or ():
        instance.enableFeatureByName(feature)
    return {feature: float(value) for feature, value in instance.execute().items()}


class SharedBins:
    """One derived image's discretisation, made by the first class that asks for it."""

    def __init__(self, options: dict[str, Any]) -> None:
        self.options = options
        self.matrix: NDArray[np.int_] | None = None
        self.levels: NDArray[np.int_] | None = None
        self.level_counts: NDArray[np.int_] | None = None
        self.shared: Matrices | None = None

    def _bin(self, matrix: NDArray[Any], roi: NDArray[np.bool_]) -> NDArray[np.int_]:
        """The binned matrix, made on first use."""
        if self.matrix is None:
            values = matrix[roi]
            binned = np.zeros(matrix.shape, dtype=int)
            binned[roi] = np.digitize(values, bin_edges(values, self.options))
            self.levels, self.level_counts = np.unique(binned[roi], return_counts=True)
            self.matrix = binned
        return self.matrix

    def binned(
        self, matrix: NDArray[Any], roi: NDArray[np.bool_]
    ) -> tuple[NDArray[np.int_], NDArray[np.int_]]:
        """``imageoperations.binImage(matrix, roi)`` and the grey levels in the ROI."""
        binned = self._bin(matrix, roi).copy()
        assert self.levels is not None
        return binned, self.levels

    def matrices(self, roi: NDArray[np.bool_], ng: int) -> Matrices:
        """The image's texture matrices (after ``binned``), made once for every class."""
        if self.shared is None:
            assert self.matrix is not None
            gldm_a = float(self.options.get("gldm_a", 0))
            self.shared = Matrices(self.matrix, roi, ng, gldm_a)
        return self.shared

    def shared_matrices(self, matrix: NDArray[Any], roi: NDArray[np.bool_]) -> Matrices:
        """The texture matrices of ``matrix`` binned (both made on first use)."""
        self._bin(matrix, roi)
        return self.matrices(roi, int(np.max(self.present_levels())))

    def present_levels(self) -> NDArray[np.int_]:
        """The grey levels in the ROI (after binning)."""
        assert self.levels is not None
        return self.levels

    def counts(self, matrix: NDArray[Any], roi: NDArray[np.bool_]) -> NDArray[np.int_]:
        """Voxels of each grey level present in the ROI, in level order."""
        self._bin(matrix, roi)
        assert self.level_counts is not None
        return self.level_counts


def bin_edges(values: NDArray[Any], options: dict[str, Any]) -> NDArray[Any]:
    """``imageoperations.getBinEdges`` with numpy's min and max (pyradiomics loops in Python)."""
    if options.get("binCount") is not None:
        return np.asarray(imageoperations.getBinEdges(values, **options))
    width = options.get("binWidth", 25)
    minimum, maximum = values.min(), values.max()
    edges = np.arange(minimum - (minimum % width), maximum + 2 * width, width)
    if len(edges) == 1:  # a flat region: one bin, as pyradiomics makes it
        edges = np.array([edges[0] - 0.5, edges[0] + 0.5])
    return edges


@functools.cache
def _sharing(cls: type) -> type:
    """``cls`` taking its discretisation from the instance's ``shared_bins`` and, where
    ``matrices.covers`` the settings, its matrix from the image's shared ``Matrices``."""
    names = cls.getFeatureNames()  # type: ignore[attr-defined]
    stock_matrix = cls._calculateMatrix  # type: ignore[attr-defined]

    def apply_binning(self: Any, matrix: NDArray[Any]) -> NDArray[np.int_]:
        binned, levels = self.shared_bins.binned(matrix, self.maskArray)
        self.coefficients["grayLevels"] = levels
        self.coefficients["Ng"] = int(np.max(levels))
        return binned

    def calculate_matrix(self: Any, voxelCoordinates: Any = None) -> Any:
        if self.voxelBased or not covers(self.settings, self.imageArray.shape):
            return stock_matrix(self, voxelCoordinates)
        shared = self.shared_bins.matrices(self.maskArray, self.coefficients["Ng"])
        # pyradiomics' own method (checks, empty levels and angles, normalisation), with
        # the matrix made here in place of its C extension's
        method = types.FunctionType(
            stock_matrix.__code__,
            {**stock_matrix.__globals__, "cMatrices": _SharedC(shared)},
            stock_matrix.__name__,
            stock_matrix.__defaults__,
            stock_matrix.__closure__,
        )
        return method(self, voxelCoordinates)

    def feature_names(_: type) -> dict[str, bool]:
        return dict(names)

    methods: dict[str, Any] = {
        "__module__": cls.__module__,  # pyradiomics names each class's logger after it
        "_applyBinning": apply_binning,
        "_calculateMatrix": calculate_matrix,
        "getFeatureNames": classmethod(feature_names),
    }
    if cls.__name__ == "RadiomicsGLCM":
        methods["_calculateCoefficients"] = _glcm_coefficients
    return type(cls.__name__, (cls,), methods)


def _glcm_coefficients(self: Any) -> None:
    """``RadiomicsGLCM._calculateCoefficients`` with the sum and difference distributions
    (p_x+y, p_x-y) as one product with a 0/1 matrix each, not a Python loop over k."""
    ng = self.coefficients["Ng"]
    eps = np.spacing(1)
    levels = self.coefficients["grayLevels"].astype("float")
    i, j = np.meshgrid(levels, levels, indexing="ij", sparse=True)
    k_sum = np.arange(2, (ng * 2) + 1, dtype="float")
    k_diff = np.arange(0, ng, dtype="float")
    p = self.P_glcm
    cells = p.reshape(p.shape[0], -1, p.shape[3])  # (images, i x j, angles)
    at_sum = (np.add(i, j).ravel()[None, :] == k_sum[:, None]).astype(float)
    at_diff = (np.abs(i - j).ravel()[None, :] == k_diff[:, None]).astype(float)
    self.coefficients |= {
        "eps": eps,
        "i": i,
        "j": j,
        "kValuesSum": k_sum,
        "kValuesDiff": k_diff,
        "px": p.sum(2, keepdims=True),
        "py": p.sum(1, keepdims=True),
        "ux": np.sum(i[None, :, :, None] * p, (1, 2), keepdims=True),
        "uy": np.sum(j[None, :, :, None] * p, (1, 2), keepdims=True),
        "pxAddy": np.matmul(at_sum, cells),
        "pxSuby": np.matmul(at_diff, cells),
        "HXY": (-1) * np.sum((p * np.log2(p + eps)), (1, 2)),
    }


class _SharedC:
    """pyradiomics' ``cMatrices`` calls answered from one image's ``Matrices``."""

    def __init__(self, shared: Matrices) -> None:
        self.shared = shared

    def calculate_glcm(self, *_: Any) -> tuple[NDArray[np.float64], NDArray[np.int_]]:
        return self.shared.get("glcm").copy(), ANGLES.copy()

    def calculate_glrlm(self, *_: Any) -> tuple[NDArray[np.float64], NDArray[np.int_]]:
        return self.shared.get("glrlm").copy(), ANGLES.copy()

    def calculate_glszm(self, *_: Any) -> NDArray[np.float64]:
        return self.shared.get("glszm").copy()

    def calculate_gldm(self, *_: Any) -> NDArray[np.float64]:
        return self.shared.get("gldm").copy()

    def calculate_ngtdm(self, *_: Any) -> NDArray[np.float64]:
        return self.shared.get("ngtdm").copy()
