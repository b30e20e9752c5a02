"""LBP-3D maps as pyradiomics 3.0.1 computes them, for SciPy without ``sph_harm``.

pyradiomics' ``getLBP3DImage`` imports ``scipy.special.sph_harm`` (removed in SciPy 1.17)
and ``trimesh``; where either is missing it logs a warning and yields nothing. This is
the same algorithm (Banerjee et al., ACCV 2012) with ``sph_harm_y`` and the icosphere
built here: rotation-invariant spherical-harmonic LBP on an icosphere around each ROI
voxel, in index space, and the spherical kurtosis.
"""

from __future__ import annotations

import functools
from itertools import combinations

import numba
import numpy as np
import SimpleITK as sitk
from numpy.typing import NDArray
from scipy.ndimage import map_coordinates, spline_filter
from scipy.special import sph_harm_y
from scipy.stats import kurtosis


def icosphere(subdivisions: int = 1, radius: float = 1.0) -> NDArray[np.float64]:
    """Vertices of trimesh's ``icosphere``: a subdivided icosahedron projected on the sphere.

    Order differs from trimesh's; the LBP-3D maps are sums and moments over the vertices,
    so they do not depend on it.
    """
    t = (1.0 + 5.0**0.5) / 2.0
    base = []
    for a in (-1.0, 1.0):
        for b in (-t, t):
            base += [(a, b, 0.0), (0.0, a, b), (b, 0.0, a)]
    vertices = np.array(base) / np.sqrt(t * t + 1.0)
    for _ in range(subdivisions):
        distances = np.linalg.norm(vertices[:, None] - vertices[None], axis=-1)
        edge = distances[distances > 1e-9].min()
        midpoints = [
            (vertices[i] + vertices[j]) / 2.0
            for i, j in combinations(range(len(vertices)), 2)
            if abs(distances[i, j] - edge) < 1e-6
        ]
        vertices = np.vstack([vertices, midpoints])
        vertices /= np.linalg.norm(vertices, axis=1, keepdims=True)
    return vertices * radius


def lbp3d_maps(
    image: sitk.Image,
    mask: sitk.Image,
    *,
    label: int = 1,
    levels: int = 2,
    radius: float = 1.0,
    subdivision: int = 1,
) -> list[tuple[sitk.Image, str]]:
    """The maps pyradiomics names ``lbp-3D-m1`` .. ``lbp-3D-m<levels>`` and ``lbp-3D-k``.

    Values are set on ROI voxels only (0 elsewhere; features use ROI voxels only). The
    keyword names follow pyradiomics' settings ``lbp3DLevels``, ``lbp3DIcosphereRadius``
    and ``lbp3DIcosphereSubdivision``.
    """
    im_arr = sitk.GetArrayFromImage(image)
    ma_arr = sitk.GetArrayFromImage(mask)
    vertices, harmonics, degree = _sphere(levels, radius, subdivision)
    roi = np.nonzero(ma_arr == label)
    samples = sphere_samples(im_arr, roi, vertices)  # (voxels, vertices)
    spherical_kurtosis = np.real(kurtosis(samples, axis=1))
    signs = np.greater_equal(samples, im_arr[roi][:, None]).astype(np.float64)
    coefficients = signs @ harmonics  # (voxels, orders): sum over the vertices
    per_level = [coefficients[:, degree == n] @ harmonics[:, degree == n].T for n in range(levels)]
    magnitudes = [np.real(np.sqrt(np.sum(f**2, axis=1))) for f in per_level]

    maps = []
    for name, values in [(f"lbp-3D-m{n + 1}", v) for n, v in enumerate(magnitudes)] + [
        ("lbp-3D-k", spherical_kurtosis)
    ]:
        result = np.zeros(im_arr.shape)
        result[roi] = values
        out = sitk.GetImageFromArray(result)
        out.CopyInformation(image)
        maps.append((out, name))
    return maps


@functools.cache
def _sphere(
    levels: int, radius: float, subdivision: int
) -> tuple[NDArray[np.float64], NDArray[np.complex128], NDArray[np.int_]]:
    """The icosphere's vertices, the spherical harmonics at them (vertices, orders) and
    each order's degree, made once per setting."""
    vertices = icosphere(subdivision, radius)
    # pyradiomics' angles, passed to the old sph_harm(m, n, theta, phi) in this order;
    # sph_harm(m, n, a, b) == sph_harm_y(n, m, b, a).
    theta = np.arccos(vertices[:, 2] / radius)
    phi = np.arctan2(vertices[:, 1], vertices[:, 0])
    orders = [(0, 0)] + [(n, m) for n in range(1, levels) for m in range(-n, n + 1)]
    harmonics = np.column_stack([sph_harm_y(n, m, phi, theta) for n, m in orders])
    degree = np.array([n for n, _ in orders])
    for array in (vertices, harmonics, degree):
        array.flags.writeable = False
    return vertices, harmonics, degree


def sphere_samples(
    image: NDArray[np.generic], roi: tuple[NDArray[np.intp], ...], vertices: NDArray[np.float64]
) -> NDArray[np.float64]:
    """``map_coordinates(image, roi voxel + vertex, order=3)`` for every ROI voxel and vertex.

    Every voxel is sampled at the same offsets, so each vertex's samples are the cubic
    B-spline coefficients correlated with one separable 4 x 4 x 4 kernel: 4-tap passes
    along the first axis over the ROI's box, then the second, then the third at the ROI's
    voxels only (``_passes``, compiled), shared between vertices with equal offsets along
    the first axes. Where a sample ties the voxel's own value within rounding (the LBP
    sign), and where a tap would leave the image, ``map_coordinates`` itself gives the value.
    """
    centres = np.array(roi)  # (3, voxels)
    low = centres.min(axis=1)
    high = centres.max(axis=1) + 1
    reach = int(np.floor(np.abs(vertices).max())) + 2
    if np.any(low < reach) or np.any(high + reach > np.array(image.shape)):
        return _mapped(image, centres, vertices)
    coefficients = spline_filter(image, order=3, output=np.float64, mode="constant")
    box = tuple(slice(a - reach, b + reach) for a, b in zip(low, high, strict=True))
    first = np.unique(vertices[:, 0], return_inverse=True)  # vertices' first-axis offsets
    pairs = np.unique(vertices[:, :2], axis=0, return_inverse=True)  # and first two axes
    samples = _passes(
        np.ascontiguousarray(coefficients[box]),
        np.ascontiguousarray(centres - low[:, None]),
        reach,
        _taps(first[0]),
        _taps(pairs[0][:, 1]),
        np.searchsorted(first[0], pairs[0][:, 0]),
        _taps(vertices[:, 2]),
        pairs[1].ravel(),
    )
    centre_values = image[roi].astype(np.float64)[:, None]
    ties = np.abs(samples - centre_values) <= 1e-9 * np.maximum(np.abs(centre_values), 1.0)
    if np.any(ties):  # the sign must be map_coordinates' own
        voxel, vertex_index = np.nonzero(ties)
        points = centres[:, voxel] + vertices[vertex_index].T
        samples[ties] = map_coordinates(image, points, order=3)
    return samples


def _taps(offsets: NDArray[np.float64]) -> NDArray[np.float64]:
    """Per offset: the first tap (floor - 1) and the cubic B-spline's 4 weights."""
    out = np.empty((len(offsets), 5))
    for k, offset in enumerate(offsets):
        floor = int(np.floor(offset))
        t = float(offset) - floor
        out[k] = (
            floor - 1,
            (1 - t) ** 3 / 6,
            (4 - 6 * t**2 + 3 * t**3) / 6,
            (1 + 3 * t + 3 * t**2 - 3 * t**3) / 6,
            t**3 / 6,
        )
    return out


@numba.njit(cache=True, nogil=True)
def _passes(
    coefficients: NDArray[np.float64],
    inside: NDArray[np.int64],
    reach: int,
    first: NDArray[np.float64],
    second: NDArray[np.float64],
    second_first: NDArray[np.int64],
    third: NDArray[np.float64],
    vertex_pair: NDArray[np.int64],
) -> NDArray[np.float64]:
    """The samples (voxels, vertices): ``coefficients`` is the ROI's box with ``reach``
    voxels around it, ``inside`` the ROI's voxels in the box; ``first``: the taps of each
    distinct first-axis offset, ``second`` of each distinct (first, second) pair
    (``second_first``: its first), ``third`` of each vertex (``vertex_pair``: its pair).
    Each pass sums its 4 taps in order, as ``w0 * v0 + w1 * v1 + w2 * v2 + w3 * v3``."""
    nz = coefficients.shape[0] - 2 * reach
    ny = coefficients.shape[1] - 2 * reach
    fy, fx = coefficients.shape[1], coefficients.shape[2]
    along_first = np.empty((len(first), nz, fy, fx))
    for k in range(len(first)):
        tap = int(first[k, 0])
        for z in range(nz):
            for y in range(fy):
                for x in range(fx):
                    out = first[k, 1] * coefficients[reach + tap + z, y, x]
                    out = out + first[k, 2] * coefficients[reach + tap + 1 + z, y, x]
                    out = out + first[k, 3] * coefficients[reach + tap + 2 + z, y, x]
                    along_first[k, z, y, x] = (
                        out + first[k, 4] * coefficients[reach + tap + 3 + z, y, x]
                    )
    samples = np.empty((inside.shape[1], len(third)))
    along_second = np.empty((nz, ny, fx))
    for pair in range(len(second)):
        source = along_first[second_first[pair]]
        tap = int(second[pair, 0])
        for z in range(nz):
            for y in range(ny):
                for x in range(fx):
                    out = second[pair, 1] * source[z, reach + tap + y, x]
                    out = out + second[pair, 2] * source[z, reach + tap + 1 + y, x]
                    out = out + second[pair, 3] * source[z, reach + tap + 2 + y, x]
                    along_second[z, y, x] = (
                        out + second[pair, 4] * source[z, reach + tap + 3 + y, x]
                    )
        for vertex in range(len(third)):
            if vertex_pair[vertex] != pair:
                continue
            tap = int(third[vertex, 0])
            for v in range(inside.shape[1]):
                z, y, x = inside[0, v], inside[1, v], reach + tap + inside[2, v]
                out = third[vertex, 1] * along_second[z, y, x]
                out = out + third[vertex, 2] * along_second[z, y, x + 1]
                out = out + third[vertex, 3] * along_second[z, y, x + 2]
                samples[v, vertex] = out + third[vertex, 4] * along_second[z, y, x + 3]
    return samples


def _mapped(
    image: NDArray[np.generic], centres: NDArray[np.intp], vertices: NDArray[np.float64]
) -> NDArray[np.float64]:
    """The samples by ``map_coordinates`` (taps that leave the image)."""
    coords = centres.T[None, :, :] + vertices[:, None, :]
    return np.asarray(map_coordinates(image, coords.T, order=3), dtype=np.float64)
