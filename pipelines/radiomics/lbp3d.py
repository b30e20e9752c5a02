"""LBP-3D maps as pyradiomics 3.0.1 computes them, for SciPy without ``sph_harm``.

pyradiomics' ``getLBP3DImage`` imports ``scipy.special.sph_harm`` (removed in SciPy 1.17)
and ``trimesh``; where either is missing it logs a warning and yields nothing. This is
the same algorithm (Banerjee et al., ACCV 2012) with ``sph_harm_y`` and the icosphere
built here: rotation-invariant spherical-harmonic LBP on an icosphere around each ROI
voxel, in index space, and the spherical kurtosis.
"""

from __future__ import annotations

from itertools import combinations

import numpy as np
import SimpleITK as sitk
from numpy.typing import NDArray
from scipy.ndimage import map_coordinates
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
    vertices = icosphere(subdivision, radius)
    # pyradiomics' angles, passed to the old sph_harm(m, n, theta, phi) in this order;
    # sph_harm(m, n, a, b) == sph_harm_y(n, m, b, a).
    theta = np.arccos(vertices[:, 2] / radius)
    phi = np.arctan2(vertices[:, 1], vertices[:, 0])
    orders = [(0, 0)] + [(n, m) for n in range(1, levels) for m in range(-n, n + 1)]
    harmonics = np.column_stack([sph_harm_y(n, m, phi, theta) for n, m in orders])
    degree = np.array([n for n, _ in orders])

    roi = np.nonzero(ma_arr == label)
    coords = np.array(roi).T[None, :, :] + vertices[:, None, :]
    samples = map_coordinates(im_arr, coords.T, order=3)  # (voxels, vertices)
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
