"""Filtered images and their features, as pyradiomics 3.0.1's ``execute`` computes them, faster.

After the image and mask are loaded (resampled, checked), stock pyradiomics walks the
enabled image types one derived image at a time, filters the whole padded block and lets
each feature class discretise the image and build its matrix again. Here the derived
images are split into tasks (one per image type, or, pooled, the LoG sigmas and the
wavelet decompositions in shares) that can run in a small pool of worker processes
(forkserver: no fork of a process holding torch or threads); in one process, all tasks
on the ROI are measured together (``run_here``). LoG images on 1 mm voxels are computed
on the ROI's box only (``log``: ITK's recursive filter as matrices, equal to the bit);
``texture`` measures the images with one discretisation per image, first-order
(``firstorder``) and texture features (``texture_features``) batched over the images,
and the five texture matrices from one walk over the neighbour offsets (``matrices``),
each equal to pyradiomics' own; where a setting is not covered, pyradiomics' own code
runs.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import select
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import radiomics
import SimpleITK as sitk
from numpy.typing import NDArray
from radiomics import imageoperations

from pipelines.radiomics.lbp3d import lbp3d_maps
from pipelines.radiomics.log import exact_spacing, log_box
from pipelines.radiomics.params import RadiomicsError, image_count
from pipelines.radiomics.texture import Derived, image_features

LBP3D = "LBP3D"
WAVELET_SHARES = 2  # wavelet decompositions are split in this many tasks when pooled
LOG_SHARES = 2  # and the LoG sigmas (contiguous runs: each task batches its images)
_logger = logging.getLogger("radiomics.imageoperations")  # where pyradiomics logs these


@dataclass(frozen=True)
class Picture:
    """A SimpleITK image as plain, picklable data."""

    array: NDArray[Any]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]

    @classmethod
    def of(cls, image: sitk.Image) -> Picture:
        """The pixels and geometry of ``image``."""
        return cls(
            sitk.GetArrayFromImage(image),
            image.GetSpacing(),
            image.GetOrigin(),
            image.GetDirection(),
        )

    def image(self) -> sitk.Image:
        """The image again, with its exact geometry."""
        image = sitk.GetImageFromArray(self.array)
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image


@dataclass(frozen=True)
class Task:
    """The features of (a share of) the derived images of one image type."""

    image: Picture
    mask: Picture
    box: tuple[int, ...]  # pyradiomics' bounding box (x lo, x hi, y lo, y hi, z lo, z hi)
    kind: str  # pyradiomics image type (Original, LoG, Wavelet, ...) or LBP3D
    options: dict[str, Any]  # settings with the image type's own
    features: dict[str, Any]  # texture class -> feature names (None: all)
    share: tuple[int, int] = (0, 1)  # (index, count): which contiguous part of the images
    cost: float = field(default=1.0, compare=False)  # scheduling weight, larger first


def tasks_for(
    image: sitk.Image,
    mask: sitk.Image,
    box: tuple[int, ...],
    types: dict[str, dict[str, Any]],
    settings: dict[str, Any],
    features: dict[str, Any],
    *,
    pooled: bool,
) -> list[Task]:
    """Tasks for the image types ``types`` (with custom settings) of one loaded image."""
    picture, mask_picture = Picture.of(image), Picture.of(mask)
    tasks = []
    for kind, custom in types.items():
        options = {**settings, **(custom or {})}
        parts: list[tuple[dict[str, Any], tuple[int, int], float]]
        if kind == "LoG" and pooled:
            sigmas = list(options.get("sigma", []))
            n = min(LOG_SHARES, len(sigmas))
            shares = [sigmas[i * len(sigmas) // n : (i + 1) * len(sigmas) // n] for i in range(n)]
            parts = [({**options, "sigma": share}, (0, 1), 2.0 * len(share)) for share in shares]
        elif kind == "Wavelet" and pooled:
            n = min(WAVELET_SHARES, image_count(kind, custom or {}, settings))
            parts = [(options, (i, n), 4.0 / n) for i in range(n)]
        else:
            parts = [(options, (0, 1), 8.0 if kind == LBP3D else 1.0)]
        tasks += [
            Task(picture, mask_picture, box, kind, opts, features, share, cost)
            for opts, share, cost in parts
        ]
    return tasks


def run_task(task: Task) -> dict[str, float]:
    """Features of the task's derived images, named as pyradiomics names them."""
    image, mask = task.image.image(), task.mask.image()
    try:
        derived = list(_derived_crops(task, image, mask))
        return image_features(derived, crop_to_box(mask, task.box), task.features)
    except ValueError as error:
        raise RadiomicsError(f"pyradiomics rejected the {task.kind} image: {error}") from error


def run_here(tasks: list[Task]) -> dict[str, float]:
    """Every task's features in this process: the derived images of consecutive tasks on
    one mask and box are measured together (one batch per feature class)."""
    out: dict[str, float] = {}
    start = 0
    while start < len(tasks):
        first = tasks[start]
        end = start + 1
        while end < len(tasks) and _same_roi(tasks[end], first):
            end += 1
        mask = first.mask.image()
        derived: list[Derived] = []
        for task in tasks[start:end]:
            try:
                derived += _derived_crops(task, task.image.image(), mask)
            except ValueError as error:
                raise RadiomicsError(
                    f"pyradiomics rejected the {task.kind} image: {error}"
                ) from error
        try:
            out |= image_features(derived, crop_to_box(mask, first.box), first.features)
        except ValueError as error:
            raise RadiomicsError(f"pyradiomics rejected a derived image: {error}") from error
        start = end
    return out


def _same_roi(task: Task, other: Task) -> bool:
    """Whether two tasks measure on the same mask, box and features."""
    return (
        tuple(task.box) == tuple(other.box)
        and task.features == other.features
        and (task.mask is other.mask or np.array_equal(task.mask.array, other.mask.array))
    )


def _derived_crops(task: Task, image: sitk.Image, mask: sitk.Image) -> Iterator[Derived]:
    """The task's derived images on the ROI's box, with their names and settings."""
    if task.kind == LBP3D:
        maps = lbp3d_maps(
            image,
            mask,
            label=int(task.options.get("label", 1)),
            levels=int(task.options.get("lbp3DLevels", 2)),
            radius=float(task.options.get("lbp3DIcosphereRadius", 1)),
            subdivision=int(task.options.get("lbp3DIcosphereSubdivision", 1)),
        )
        for derived, name in maps:
            yield crop_to_box(derived, task.box), name, task.options
    elif task.kind == "LoG" and exact_spacing(image.GetSpacing()):
        yield from _log_crops(task, image)
    else:  # pyradiomics' generator: one filtered image at a time
        make = getattr(imageoperations, f"get{task.kind}Image")
        for derived, name, options in _share(make(image, mask, **task.options), task):
            yield crop_to_box(derived, task.box), name, options


def _log_crops(task: Task, image: sitk.Image) -> Iterator[Derived]:
    """``imageoperations.getLoGImage`` (same checks, names, warnings), computed on the box."""
    size = np.array(image.GetSize())
    if np.min(size) < 4:
        _logger.warning("Image too small to apply LoG filter, size: %s", size)
        return
    low, high = task.box[0::2], task.box[1::2]
    box = [(lo, hi + 1) for lo, hi in zip(low[::-1], high[::-1], strict=True)]
    for sigma in task.options.get("sigma", []):
        if sigma <= 0.0:
            _logger.warning("applyLoG: sigma must be greater than 0.0: %g", sigma)
        elif not np.all(size >= np.ceil(sigma / np.array(image.GetSpacing())) + 1):
            _logger.warning("applyLoG: sigma(%g) too large for the image size %s", sigma, size)
        else:
            values = log_box(task.image.array, float(sigma), box)
            name = f"log-sigma-{str(sigma).replace('.', '-')}-mm-3D"
            yield _on_box(values, image, low), name, task.options


def crop_to_box(image: sitk.Image, box: tuple[int, ...]) -> sitk.Image:
    """``imageoperations.cropToTumorMask`` without padding, by numpy slicing.

    The voxels and spacing are the ones ITK's crop gives (features read only these); the
    mask is cropped once per task instead of once per derived image.
    """
    low, high = box[0::2], box[1::2]
    index = tuple(slice(lo, hi + 1) for lo, hi in zip(low[::-1], high[::-1], strict=True))
    return _on_box(sitk.GetArrayViewFromImage(image)[index], image, low)


def _on_box(values: NDArray[Any], image: sitk.Image, low: tuple[int, ...]) -> sitk.Image:
    """``values``, the part of ``image`` whose first voxel is at index ``low`` (x, y, z)."""
    out = sitk.GetImageFromArray(values)
    out.SetSpacing(image.GetSpacing())
    out.SetDirection(image.GetDirection())
    out.SetOrigin(image.TransformIndexToPhysicalPoint([int(i) for i in low]))
    return out


def _share(images: Any, task: Task) -> Any:
    """The task's contiguous share of a generator's images (all of them for share (0, 1))."""
    index, count = task.share
    if count == 1:
        yield from images
        return
    total = image_count(task.kind, task.options, task.options)
    low, high = index * total // count, (index + 1) * total // count
    for position, item in enumerate(images):
        if low <= position < high:
            yield item


def run_tasks(
    tasks: list[Task], workers: int, meanwhile: Callable[[], dict[str, float]]
) -> dict[str, float]:
    """``meanwhile()`` (in this process), then every task's features, in task order.

    With ``workers`` > 1 and more than one task the tasks run in the worker pool, largest
    first, while ``meanwhile`` runs here; a pool whose worker died is replaced and this
    extraction's tasks run here instead. A multiprocessing child runs them all itself.
    """
    # Not in a multiprocessing child: a daemonic one may not start processes, and any
    # other joins its children before its pools are closed, so it would not exit.
    if workers <= 1 or len(tasks) <= 1 or multiprocessing.parent_process() is not None:
        return meanwhile() | run_here(tasks)
    pool = _Pool.get(workers)
    futures: dict[int, Future[dict[str, float]]] = {}
    try:
        for i in sorted(range(len(tasks)), key=lambda i: -tasks[i].cost):
            futures[i] = pool.submit(run_task, tasks[i])
        out = meanwhile()
        for i in range(len(tasks)):
            out |= futures[i].result()
        return out
    except BrokenProcessPool:
        _Pool.discard(pool)
        return run_tasks(tasks, 1, meanwhile)


def shutdown_pool() -> bool:
    """Stop the worker pool's processes and wait for them (a stopping node calls this
    once its jobs ended); False when no pool was made. An extraction after it makes a
    new pool. (multiprocessing's forkserver, idle, stays until the process exits.)"""
    return _Pool.shutdown()


def _worker_start(verbosity: int, owner: int) -> None:
    """Each worker runs ITK filters on one thread (the pool is the parallelism) and logs
    pyradiomics' messages from ``verbosity`` up, as the process that made the pool does;
    it ends with that process, ``owner`` (:func:`_end_with`)."""
    _end_with(owner)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    radiomics.setVerbosity(verbosity)


def _end_with(owner: int) -> None:
    """End this worker when process ``owner`` ends (Linux: a thread waits on its pidfd).

    A process killed with SIGKILL (or by the OOM killer) runs no shutdown; its workers,
    children of the forkserver, would wait on their task queue for ever, and keep the
    forkserver alive too (they hold its alive pipe)."""
    try:
        handle = os.pidfd_open(owner)
    except ProcessLookupError:  # it ended already
        os._exit(0)
    except (AttributeError, OSError):  # no pidfd here: the pool's shutdown still ends us
        return

    def wait() -> None:
        select.select([handle], [], [])
        os._exit(0)

    threading.Thread(target=wait, name="radiomics-pool-owner", daemon=True).start()


class _Pool:
    """The process-wide worker pool, made on first use and kept for later extractions."""

    _lock = threading.Lock()
    _pool: ProcessPoolExecutor | None = None
    _size = 0

    @classmethod
    def get(cls, workers: int) -> ProcessPoolExecutor:
        """The pool, (re)made with ``workers`` processes."""
        with cls._lock:
            if cls._pool is None or cls._size != workers:
                if cls._pool is not None:
                    cls._pool.shutdown(wait=False, cancel_futures=True)
                context = multiprocessing.get_context("forkserver")
                context.set_forkserver_preload([__name__])
                cls._pool = ProcessPoolExecutor(
                    max_workers=workers,
                    mp_context=context,
                    initializer=_worker_start,
                    initargs=(int(radiomics.handler.level), os.getpid()),
                )
                cls._size = workers
            return cls._pool

    @classmethod
    def shutdown(cls) -> bool:
        """Stop the pool's worker processes and wait for them to exit; False when there
        was no pool. The next extraction makes a new pool."""
        with cls._lock:
            pool, cls._pool, cls._size = cls._pool, None, 0
        if pool is None:
            return False
        pool.shutdown(wait=True, cancel_futures=True)
        return True

    @classmethod
    def discard(cls, pool: ProcessPoolExecutor) -> None:
        """Forget ``pool`` (broken) so that the next extraction makes a new one."""
        with cls._lock:
            if cls._pool is pool:
                cls._pool = None
        pool.shutdown(wait=False, cancel_futures=True)
