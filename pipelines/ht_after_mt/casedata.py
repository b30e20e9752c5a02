"""What one ``ht_after_mt`` run keeps for retraining (``pipelines.base.CaseRecord``), and
the case features rebuilt from it.

Every run keeps the resampled volume (HU as int16) and its affine, and the segmenter's
candidate regions on its grid: what follow-up label derivation needs
(``pipelines.followup.derive.labels_from_masks``). A run that scored a lesion also keeps
the scored lesion (grid and frame masks), the CNN input samples and their provenance,
the radiomics and clinical values, and the radiomics parameters and CNN input settings
they were computed with: what a candidate is trained on and what the version in service
scores again, without the images (:func:`features_from_record`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from pipelines.base import CaseRecord
from pipelines.cnn.inputs import CaseInput, CropBox
from pipelines.ht_after_mt.features import CaseFeatures, Lesion
from pipelines.series import LoadedSeries

HU_RANGE = (-32768, 32767)


def imaging_arrays(series: LoadedSeries, regions: NDArray[np.int32]) -> dict[str, NDArray[Any]]:
    """The volume (int16 HU), its affine and the candidate regions (uint8 mask)."""
    hu = np.clip(np.rint(series.volume.hu), *HU_RANGE).astype(np.int16)
    return {
        "volume_hu": hu,
        "volume_affine": np.asarray(series.volume.affine, dtype=np.float64),
        "regions": (regions > 0).astype(np.uint8),
    }


def case_record(
    series: LoadedSeries,
    regions: NDArray[np.int32],
    case: CaseFeatures | None = None,
    radiomics_params: str = "",
    model_inputs: Mapping[str, Any] | None = None,
) -> CaseRecord:
    """The record of one run: imaging always, the scored case's inputs when ``case``.
    ``model_inputs``: the model's CNN input settings (``input_config_to_dict``)."""
    arrays = imaging_arrays(series, regions)
    if case is None:
        return CaseRecord(arrays)
    cnn = case.cnn_input
    arrays |= {
        "lesion_grid": case.lesion.grid_mask.astype(np.uint8),
        "lesion_frames": case.lesion.frame_mask.astype(np.uint8),
        "cnn_samples": cnn.samples.detach().cpu().numpy().astype(np.float32),
    }
    inputs = {
        "radiomics_params": radiomics_params,
        "cnn_input": dict(model_inputs or {}),
        "key_frame": cnn.key_frame,
        "key_sample": cnn.key_sample,
        "sample_centres": list(cnn.sample_centres),
        "sample_frames": [list(f) for f in cnn.sample_frames],
        "crop": [cnn.crop.row0, cnn.crop.col0, cnn.crop.side],
        "frame_shape": list(cnn.frame_shape),
        "lesion_volume_ml": case.lesion.volume_ml,
        "regions_found": case.lesion.regions_found,
    }
    features: dict[str, Mapping[str, float | None]] = {
        "radiomics": dict(case.radiomics),
        "clinical": dict(case.clinical),
    }
    return CaseRecord(arrays, features, inputs)


def scored(record: CaseRecord) -> bool:
    """Whether the record holds a scored case (model inputs and features)."""
    return "cnn_samples" in record.arrays and "radiomics" in record.features


def features_from_record(record: CaseRecord) -> CaseFeatures:
    """The case features the model scored, rebuilt from a scored record."""
    if not scored(record):
        raise ValueError("the record holds no scored lesion")
    inputs, arrays = record.inputs, record.arrays
    row0, col0, side = (int(v) for v in inputs["crop"])
    rows, columns = (int(v) for v in inputs["frame_shape"])
    cnn = CaseInput(
        samples=torch.from_numpy(np.asarray(arrays["cnn_samples"], dtype=np.float32)),
        key_frame=int(inputs["key_frame"]),
        key_sample=int(inputs["key_sample"]),
        sample_centres=tuple(int(v) for v in inputs["sample_centres"]),
        sample_frames=tuple(tuple(int(v) for v in f) for f in inputs["sample_frames"]),
        crop=CropBox(row0, col0, side),
        frame_shape=(rows, columns),
    )
    lesion = Lesion(
        grid_mask=np.asarray(arrays["lesion_grid"]).astype(bool),
        frame_mask=np.asarray(arrays["lesion_frames"]).astype(bool),
        volume_ml=float(inputs["lesion_volume_ml"]),
        regions_found=int(inputs["regions_found"]),
    )
    radiomics = {k: float(v) for k, v in record.features["radiomics"].items() if v is not None}
    clinical = {k: None if v is None else float(v) for k, v in record.features["clinical"].items()}
    return CaseFeatures(lesion=lesion, radiomics=radiomics, cnn_input=cnn, clinical=clinical)
