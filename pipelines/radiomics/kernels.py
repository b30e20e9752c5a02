"""The compiled (numba) kernels of the radiomics code, compiled ahead of the first job.

``matrices._kernel`` / ``matrices._zones`` (texture matrices) and ``lbp3d._passes``
(LBP-3D sphere samples) are compiled on their first call, about 1 s, and the machine
code is cached on disk (``cache=True``): in ``__pycache__`` beside the modules, or in
``NUMBA_CACHE_DIR`` where that is set (deploy/Containerfile, the systemd units: the
package folder is read-only there). A later process loads the cache in ~0.1 s. The cache
is keyed by the source files and the CPU: a host with another CPU compiles once more on
its first job and adds its own entry, so the cache folder must stay writable.

``python -m pipelines.radiomics.kernels`` compiles them (the container image does at
build time).
"""

from __future__ import annotations

import numpy as np

from pipelines.radiomics import lbp3d, matrices


def compile_kernels() -> None:
    """Run every kernel once on a small ROI (compiles it, or loads it from the cache)."""
    roi = np.zeros((5, 6, 7), dtype=bool)
    roi[1:4, 1:5, 1:6] = True
    binned = np.where(roi, np.indices(roi.shape).sum(0) % 3 + 1, 0)
    matrices.all_matrices(binned, roi, 3, 0.0)
    image = np.indices((12, 12, 12)).sum(0).astype(np.float64)
    inside = np.zeros(image.shape, dtype=bool)
    inside[4:8, 4:8, 4:8] = True  # 3 voxels from the edges: the compiled path
    lbp3d.sphere_samples(image, np.nonzero(inside), lbp3d.icosphere(1, 1.0))


if __name__ == "__main__":
    compile_kernels()
