"""BLAST-CT v1: strict loading, the manifest check, whole-volume == reference tiling,
determinism, and the IPH segment on the real GE head CT with a synthetic haematoma."""

from __future__ import annotations

import itertools
import math
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch

from dicomnode.processing import JobFailure, run_pipeline
from pipelines.blast_ct import BlastCtParameters, BlastCtPipeline
from pipelines.blast_ct.inference import (
    box_logits,
    ensemble_sum,
    reference_logits,
)
from pipelines.blast_ct.network import Block, DeepMedic
from pipelines.blast_ct.prepared import (
    BACKGROUND,
    Footprint,
    PreparedMember,
    boxes,
    covering_windows,
    footprint,
    window_cost,
)
from pipelines.blast_ct.preprocess import (
    nearest_from_1mm,
    radiological,
    resample_to_1mm,
    window,
)
from pipelines.blast_ct.segments import CLASS_SEGMENTS
from pipelines.blast_ct.weights import (
    ENSEMBLE_SIZE,
    BlastCtUnavailable,
    WeightsChanged,
    load_ensemble,
    load_manifest,
    member_file,
    weights_dir,
)
from pipelines.geometry import represented_thickness
from pipelines.outputs import build_outputs
from pipelines.outputs.regions import segment_plan
from pipelines.registry import pipeline_factory
from pipelines.settings import BlastCtSettings, PipelinesSettings
from pipelines.stages import StageTimer, recording
from pipelines.synthetic import insert_lesion, synthetic_head_ct, write_series
from pipelines.volume import load_series
from tests.dciodvfy import dciodvfy_errors
from tests.support import shared_path

CPU = torch.device("cpu")

# Measured on the GE head CT with a 20.4 mL, 70 HU irregular haematoma (seed 1), member 1
# alone: IPH Dice 0.974, IPH outside the haematoma 0.82 mL, EAH and IVH empty, and 16.7 mL
# of oedema in one region around the haematoma (the model was trained on haematomas with
# perilesional oedema). The bounds leave a margin.
MIN_DICE = 0.85
MAX_IPH_FALSE_POSITIVE_ML = 3.0
MAX_EAH_IVH_ML = 2.0


@pytest.fixture(scope="module")
def folder() -> Path:
    """The weights folder, or skip saying where the files belong."""
    return shared_path(weights_dir() / member_file(1)).parents[1]


@pytest.fixture(scope="module")
def member(folder: Path) -> DeepMedic:
    """Member 1, hash-checked."""
    return load_ensemble([1], CPU, folder)[0]


@pytest.mark.shared
def test_every_member_loads_strictly(folder: Path) -> None:
    manifest = load_manifest()
    assert sorted(manifest["files"]) == sorted(member_file(i) for i in range(1, 13))
    assert manifest["licence"]["spdx"] == "Apache-2.0"
    for i in range(1, ENSEMBLE_SIZE + 1):
        state = torch.load(folder / member_file(i), map_location="cpu", weights_only=True)
        DeepMedic().load_state_dict(state, strict=True)
    assert len(load_ensemble(range(1, 13), CPU, folder)) == ENSEMBLE_SIZE


def test_missing_weights_say_where_to_put_them(tmp_path: Path) -> None:
    with pytest.raises(BlastCtUnavailable, match=r"\[pipelines\.blast_ct\] weights_dir"):
        load_ensemble([1], CPU, tmp_path)
    assert weights_dir(tmp_path) == tmp_path


@pytest.mark.shared
def test_tampered_weights_are_refused(folder: Path, tmp_path: Path) -> None:
    copy = tmp_path / member_file(2)
    copy.parent.mkdir(parents=True)
    shutil.copyfile(folder / member_file(2), copy)
    copy.chmod(0o644)
    assert len(load_ensemble([2], CPU, tmp_path)) == 1
    data = bytearray(copy.read_bytes())
    data[-100] ^= 0x01
    copy.write_bytes(bytes(data))
    with pytest.raises(WeightsChanged, match="sha256"):
        load_ensemble([2], CPU, tmp_path)


@pytest.mark.shared
def test_whole_volume_equals_reference_tiling(member: DeepMedic) -> None:
    """2 x 2 x 2 reference tiles of 110^3 against one pass and against small boxes."""
    generator = torch.Generator().manual_seed(0)
    image = torch.rand((1, 1, 37, 41, 33), generator=generator) * 2 - 1
    whole_box = ((0, 37), (0, 41), (0, 33))
    with torch.inference_mode():
        reference = reference_logits(member, image)
        whole = box_logits(member, image, whole_box)
        pieces = torch.zeros_like(whole)
        everywhere = ((0, 37), (0, 41), (0, 33))
        area = Footprint((37, 41, 33), {1: everywhere, 3: everywhere, 5: everywhere}, everywhere)
        for box in boxes(area, (16, 17, 11)):
            region = tuple(slice(a, b) for a, b in box)
            pieces[(slice(None), slice(None), *region)] = box_logits(member, image, box)
        head_rows = member.head([torch.ones((1, 50, 2, 3, 4)) * k for k in (0.1, -0.2, 0.3)])
        head_conv = member.fully_connected(
            torch.cat([torch.ones((1, 50, 2, 3, 4)) * k for k in (0.1, -0.2, 0.3)], dim=1)
        )
    scale = float(reference.abs().max())
    assert float((whole - reference).abs().max()) <= 1e-5 * scale
    assert float((pieces - whole).abs().max()) <= 1e-5 * scale
    assert torch.equal(whole.argmax(1), reference.argmax(1))
    assert float((head_rows - head_conv).abs().max()) <= 1e-5 * float(head_conv.abs().max())


def random_member(seed: int) -> DeepMedic:
    """A member with random weights, batch-norm statistics and PReLU slopes (eval mode);
    as in the published members, some norms scale channels by a negative number or zero."""
    torch.manual_seed(seed)
    model = DeepMedic()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm3d):
                assert module.running_mean is not None and module.running_var is not None
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.weight[1::4] *= -1.0
                module.weight[2::7] = 0.0
                module.bias.uniform_(-0.2, 0.2)
            elif isinstance(module, torch.nn.PReLU):
                module.weight.uniform_(-0.1, 0.3)
    return model.eval()


def test_prepared_forward_equals_reference_forward() -> None:
    """Random weights, a random 'head' in a background band: the prepared members (channels-
    last, norms folded, streamed along z in chunks and columns, background skipped)
    against the reference's patch-by-patch forward."""
    image = np.full((20, 26, 80), BACKGROUND, dtype=np.float32)
    image[4:16, 3:22, 6:24] = np.random.default_rng(2).uniform(-1, 1, (12, 19, 18))
    area = footprint(image)
    assert area.region == ((0, 20), (0, 26), (0, 65))  # the last 15 voxels along x skipped
    assert area.coarse[1] == ((0, 20), (0, 26), (0, 32))
    members = [random_member(seed) for seed in (3, 4)]
    volume = torch.from_numpy(image)[None, None]
    with torch.inference_mode():
        references = [reference_logits(m, volume) for m in members]
        prepared = PreparedMember(members[0])
        scale = float(references[0].abs().max())
        for size in ((1, 26, 80), (3, 10, 12), (7, 13, 32), (20, 64, 64)):
            chunks = list(prepared.logit_chunks(volume, area, size))
            assert [z for z, _ in chunks] == list(itertools.pairwise([*range(0, 20, size[0]), 20]))
            logits = torch.cat([c for _, c in chunks], dim=2)
            error = float((logits - references[0][..., :65]).abs().max())
            assert error <= 1e-5 * scale, size
        background = prepared.background_logits.flatten()
        assert (
            float((references[0][0, :, :, :, 65:] - background[:, None, None, None]).abs().max())
            <= 1e-5 * scale
        )
        expected = sum(torch.softmax(r, dim=1)[0] for r in references)
    assert isinstance(expected, torch.Tensor)
    for size in ((8, 16, 40), (5, 7, 9), (64, 320, 320)):
        summed = ensemble_sum(members, image, size, CPU)
        assert float(np.abs(summed - expected.numpy()).max()) <= 1e-4, size
        assert np.array_equal(summed.argmax(axis=0), expected.argmax(dim=0).numpy()), size
    assert float(expected.max()) < 1.95 and expected.argmax(dim=0).unique().numel() > 1
    blank = np.full((5, 6, 7), BACKGROUND, dtype=np.float32)
    assert footprint(blank).empty
    with torch.inference_mode():
        plain = torch.softmax(
            box_logits(members[0], torch.from_numpy(blank)[None, None], ((0, 5), (0, 6), (0, 7))),
            dim=1,
        )
    assert (
        float(np.abs(ensemble_sum(members[:1], blank, (8, 8, 8), CPU) - plain[0].numpy()).max())
        <= 1e-5
    )


def test_constant_parts_of_the_head_box_are_skipped_exactly() -> None:
    """A 'head' with background inside its bounding box: two blobs apart in y and x, one
    on the volume's edge, a thin line, and a gap along z where the full-resolution pathway
    is constant over whole chunks; a member with dead channels (scaled by zero in the norm
    after them and in the head's). The prepared member (dead channels pruned,
    full-resolution pathway in per-chunk windows, head voxel by voxel only where that
    pathway varies, once per coarse cell elsewhere) against the plain whole-volume pass."""
    rng = np.random.default_rng(5)
    image = np.full((48, 56, 52), BACKGROUND, dtype=np.float32)
    z, y, x = np.ogrid[:48, :56, :52]
    blob = ((z - 1) / 3.0) ** 2 + ((y - 14) / 9.0) ** 2 + ((x - 12) / 8.0) ** 2 <= 1.0
    edge = ((z - 45) / 5.0) ** 2 + ((y - 40) / 10.0) ** 2 + ((x - 48) / 9.0) ** 2 <= 1.0
    for mask in (blob, edge):
        image[mask] = rng.uniform(-1.0, 1.0, int(mask.sum()))
    image[44, 5:50, 3] = rng.uniform(-0.5, 1.0, 45)  # a thin line, as a head holder's
    area = footprint(image)
    assert area.varying is not None
    assert area.fine_window((21, 24)) is None  # whole chunks of constant full-resolution output
    region = tuple(slice(a, b) for a, b in area.region)
    assert float(area.varying[region].mean()) < 0.6
    member = random_member(6)
    with torch.no_grad():  # dead channels, as in the published members: never read
        for index, pathway in enumerate(member.pathways):
            last = pathway.path[-1]
            assert isinstance(last, Block)
            last.bn.weight[:6] = 0.0
            member.fully_connected[0].bn.weight[50 * index : 50 * index + 6] = 0.0
    volume = torch.from_numpy(image)[None, None]
    with torch.inference_mode():
        whole = box_logits(member, volume, ((0, 48), (0, 56), (0, 52)))
        plain = whole[(..., *region)]
        prepared = PreparedMember(member)
        widths = [int(blocks[-1].weight.shape[0]) for _, blocks in prepared.pathways]
        assert max(widths) <= 44 and int(prepared.head[0].weight.shape[1]) == sum(widths)
        scale = float(plain.abs().max())
        for size in ((1, 56, 52), (3, 10, 12), (7, 13, 32), (8, 320, 320), (48, 64, 64)):
            logits = torch.cat([c for _, c in prepared.logit_chunks(volume, area, size)], dim=2)
            assert float((logits - plain).abs().max()) <= 1e-5 * scale, size
    expected = torch.softmax(whole, dim=1)[0]
    summed = ensemble_sum([member], image, (8, 320, 320), CPU)
    assert float(np.abs(summed - expected.numpy()).max()) <= 1e-5
    assert np.array_equal(summed.argmax(axis=0), expected.argmax(dim=0).numpy())


def test_covering_windows_cover_the_varying_pixels_at_less_cost() -> None:
    """Two blobs apart and a thin line, as a head and its holder: the windows cover every
    varying pixel once, cost fewer multiply-accumulates than the bounding box, and an
    empty mask needs none."""
    varying = np.zeros((120, 110), dtype=bool)
    y, x = np.ogrid[:120, :110]
    varying[((y - 40) / 30.0) ** 2 + ((x - 45) / 35.0) ** 2 <= 1.0] = True
    varying[100:104, 90:108] = True
    varying[5:115, 2] = True
    windows = covering_windows(varying, (7, 3))
    covered = np.zeros_like(varying, dtype=np.int64)
    for (ya, yb), (xa, xb) in windows:
        covered[ya - 7 : yb - 7, xa - 3 : xb - 3] += 1
    assert covered.max() == 1 and covered[varying].min() == 1
    cost = sum(window_cost(yb - ya, xb - xa) for (ya, yb), (xa, xb) in windows)
    assert len(windows) > 1 and cost < 0.9 * window_cost(110, 106)
    assert covering_windows(np.zeros((5, 5), dtype=bool), (0, 0)) == []


@pytest.mark.shared
def test_inference_is_deterministic(member: DeepMedic) -> None:
    image = np.random.default_rng(1).uniform(-1, 1, (20, 34, 26)).astype(np.float32)
    first = ensemble_sum([member, member], image, (20, 17, 26), CPU)
    second = ensemble_sum([member, member], image, (20, 17, 26), CPU)
    assert np.array_equal(first, second)
    assert np.allclose(first.sum(axis=0), 2.0, atol=1e-5)


def test_preprocessing_geometry_and_window() -> None:
    affine = np.diag([1.0, 1.0, -2.0, 1.0])  # array axes run along +x, +y, -z (LPS)
    orient = radiological(affine)
    assert orient.order == (2, 1, 0) and orient.flip == (True, False, False)
    array = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    assert np.array_equal(orient.undo(orient.apply(array)), array)
    ramp = np.tile(np.arange(5, dtype=np.float32) * 10, (3, 3, 1))  # x spacing 2 mm
    resampled = resample_to_1mm(ramp, (1.0, 1.0, 2.0))
    assert resampled.shape == (3, 3, 9)
    assert np.array_equal(resampled[0, 0], np.arange(9, dtype=np.float32) * 5)
    assert np.array_equal(
        window(np.array([-1000, -15, 42.5, 100, 3000], dtype=np.float32)),
        np.array([-1, -1, 0, 1, 1], dtype=np.float32),
    )
    labels = np.arange(9, dtype=np.uint8)[None, None, :].repeat(3, 0).repeat(3, 1)
    back = nearest_from_1mm(labels, (3, 3, 5), (1.0, 1.0, 2.0))
    assert np.array_equal(back[0, 0], [0, 2, 4, 6, 8])


@pytest.mark.shared
def test_haematoma_in_real_head_ct(folder: Path, ge_headct_dir: Path, tmp_path: Path) -> None:
    """One member (CPU time); the ensemble's numbers are measured by bench/blast_ct.py."""
    datasets = [pydicom.dcmread(p) for p in sorted(ge_headct_dir.glob("*.dcm"))]
    radius = (3.0 * 20.0 * 1000.0 / (4.0 * math.pi)) ** (1.0 / 3.0)
    lesion = insert_lesion(datasets, center_mm=None, radius_mm=radius, hu=70.0, seed=1)
    assert 10.0 <= lesion.volume_ml <= 30.0
    series = load_series(write_series(datasets, tmp_path))
    pipeline = BlastCtPipeline(BlastCtParameters(members=(1,), device="cpu", weights_dir=folder))
    with recording(StageTimer()) as timer:
        result = pipeline.run(series)
    seconds = timer.seconds()  # the members' inference is the job's segmentation stage
    assert seconds["segmentation"] > 0.8 * sum(seconds.values()), seconds
    assert result.algorithm.name == "BLAST-CT v1 (DeepMedic ensemble, 1 member)"
    assert "Apache-2.0" in result.algorithm.provenance
    assert [s.segment for s in result.segments] == list(CLASS_SEGMENTS)
    index = {str(ds.SOPInstanceUID): i for i, ds in enumerate(datasets)}
    inserted = lesion.masks[[index[f.sop_instance_uid] for f in series.frames]]
    iph = result.segments[0].frame_mask
    dice = 2.0 * np.count_nonzero(iph & inserted) / (iph.sum() + inserted.sum())
    thickness = represented_thickness(series.stack.offsets[:, 0])
    pixel_ml = float(np.prod(series.stack.pixel_spacing)) / 1000.0

    def ml(mask: np.ndarray) -> float:
        """Planimetric volume of a frame mask, mL."""
        return float(np.sum(mask.sum(axis=(1, 2)) * thickness)) * pixel_ml

    assert dice > MIN_DICE
    assert ml(iph & ~inserted) < MAX_IPH_FALSE_POSITIVE_ML
    eah, ivh = result.segments[1].frame_mask, result.segments[3].frame_mask
    assert ml(eah | ivh) < MAX_EAH_IVH_ML
    outputs = build_outputs(series, result, pipeline_name="blast_ct", profile=pipeline.profile)
    planned = segment_plan(result)  # one SEG segment per region, an empty class as one
    assert len(outputs[0].SegmentSequence) == len(planned)
    assert {p.class_index for p in planned} == {0, 1, 2, 3}
    assert all("HYPERDENSE" not in ds.SeriesDescription for ds in outputs)
    for number, ds in enumerate(outputs):
        path = tmp_path / f"out-{number}.dcm"
        ds.save_as(path, enforce_file_format=True)
        assert dciodvfy_errors(path) == [], number


def test_node_falls_back_to_its_default_without_the_weights(tmp_path: Path) -> None:
    """Where the weights are absent, a job routed to blast_ct runs the default pipeline."""
    (tmp_path / "no-weights").mkdir()
    settings = PipelinesSettings(blast_ct=BlastCtSettings(weights_dir=tmp_path / "no-weights"))
    build = pipeline_factory(settings)
    files = write_series(synthetic_head_ct(seed=4, n_slices=12, rows=96), tmp_path / "in")
    written = run_pipeline(
        files, "blast_ct", tmp_path / "out", fallback="hyperdense_regions", pipelines=build
    )
    sr = pydicom.dcmread(written[-1])
    assert sr.ManufacturerModelName == "hyperdense_regions"
    with pytest.raises(JobFailure, match=r"\[pipelines\.blast_ct\] weights_dir"):
        run_pipeline(files, "blast_ct", tmp_path / "out2", pipelines=build)
