"""Model artefacts: skops + safetensors round trip, hash checks, schema and type refusals."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import skops.io as sio
from numpy.typing import NDArray
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.datasets import make_classification

from model_store.artefacts import (
    SYNTHETIC_NOTICE,
    ModelArtefact,
    TrainingRecord,
    UntrustedTypesError,
    label_table_bytes,
    load_model,
    save_model,
    training_data_hash,
    trusted_types,
)
from model_store.registry import (
    MANIFEST,
    STORE_ROOT,
    ModelStoreError,
    list_versions,
    load_parameters,
    promote,
    read_manifest,
    select_version,
    sha256_hex,
    write_manifest,
)
from pipelines.models import FeatureBlocks, ModelRecipe, classifier_pipeline, fit_variants

torch = pytest.importorskip("torch")

NAME = "ht_after_mt"


class Sneaky(ClassifierMixin, BaseEstimator):
    """A type defined outside the trusted packages."""

    def fit(self, X: Any, y: Any) -> Sneaky:
        """Remember nothing."""
        self.classes_ = np.unique(y)
        return self


def cohort() -> tuple[FeatureBlocks, NDArray[np.int64]]:
    """A small cohort with named blocks."""
    X, y = make_classification(
        120, 12, n_informative=5, class_sep=1.5, shuffle=False, random_state=1
    )
    features = FeatureBlocks(
        case_ids=tuple(f"C{i:03d}" for i in range(120)),
        blocks={"clinical": X[:, :3], "radiomics": X[:, 3:8], "dl": X[:, 8:]},
        feature_names={
            "clinical": ("age", "nihss", "aspects"),
            "radiomics": tuple(f"r{i}" for i in range(5)),
            "dl": tuple(f"d{i}" for i in range(4)),
        },
    )
    return features, y.astype(np.int64)


@pytest.fixture(scope="module")
def fitted() -> tuple[FeatureBlocks, NDArray[np.int64], dict[str, Any], ModelRecipe]:
    """Two variants and a logistic model fitted once for the module."""
    features, y = cohort()
    recipe = ModelRecipe(classifier="knn", seed=3, classifier_params={"n_neighbors": 9})
    models: dict[str, Any] = dict(
        fit_variants(recipe, features, y, variants=("combined", "clinical"))
    )
    models["logistic"] = classifier_pipeline("logistic", "ht_single_source").fit(
        features.matrix(), y
    )
    return features, y, models, recipe


def record_for(
    features: FeatureBlocks, y: NDArray[np.int64], recipe: ModelRecipe
) -> TrainingRecord:
    """The manifest record of the fitted models."""
    return TrainingRecord(
        recipe=recipe.to_dict(),
        feature_names=features.column_names,
        training_data_hash=training_data_hash(
            features.case_ids, label_table_bytes(features.case_ids, list(y))
        ),
        metrics={"combined": {"auc": 0.9, "ppv": None}},
        cutoffs={"combined": 0.4, "clinical": 0.5},
        primary="combined",
        extra={"n_training_cases": features.n_cases},
    )


@pytest.fixture
def saved(
    tmp_path: Path, fitted: tuple[FeatureBlocks, NDArray[np.int64], dict[str, Any], ModelRecipe]
) -> Path:
    """A saved version 1.0.0 with skops estimators and safetensors weights."""
    features, y, models, recipe = fitted
    weights = {
        "cnn": {"conv.weight": torch.arange(24.0).reshape(2, 3, 4), "fc.bias": torch.ones(2)}
    }
    save_model(NAME, "1.0.0", models, record_for(features, y, recipe), weights, root=tmp_path)
    return tmp_path


def test_saved_model_loads_back_to_identical_predictions(
    saved: Path, fitted: tuple[FeatureBlocks, NDArray[np.int64], dict[str, Any], ModelRecipe]
) -> None:
    features, y, models, recipe = fitted
    folder = saved / NAME / "1.0.0"
    assert sorted(p.name for p in folder.iterdir()) == [
        "clinical.skops",
        "cnn.safetensors",
        "combined.skops",
        "logistic.skops",
        MANIFEST,
    ]
    artefact = load_model(NAME, root=saved)
    assert isinstance(artefact, ModelArtefact)
    assert artefact.version == "1.0.0"
    X = features.matrix()
    for key, model in models.items():
        np.testing.assert_array_equal(
            artefact.estimators[key].predict_proba(X), model.predict_proba(X)
        )
    assert artefact.primary.predict_proba(X).shape == (y.size, 2)
    assert artefact.cutoff == 0.4
    assert artefact.feature_names == features.column_names
    assert artefact.notice == SYNTHETIC_NOTICE == "trained on synthetic data — not for clinical use"
    assert ModelRecipe.from_dict(artefact.manifest["recipe"]) == recipe
    manifest = artefact.manifest
    assert manifest["schema_version"] == 1
    assert manifest["provenance"] == SYNTHETIC_NOTICE
    assert manifest["n_training_cases"] == 120
    assert manifest["metrics"]["combined"]["ppv"] is None
    assert manifest["created"].endswith("+00:00")
    for filename, entry in manifest["files"].items():
        assert entry["sha256"] == hashlib.sha256((folder / filename).read_bytes()).hexdigest()
    assert "pipelines.selection.lasso.LassoSelector" in manifest["files"]["combined.skops"]["types"]
    weights = artefact.weights("cnn")
    assert torch.equal(weights["conv.weight"], torch.arange(24.0).reshape(2, 3, 4))
    assert torch.equal(weights["fc.bias"], torch.ones(2))
    with pytest.raises(ModelStoreError, match="no weights"):
        artefact.weights("unet")


def test_a_changed_byte_in_any_file_is_refused_naming_the_file(saved: Path) -> None:
    folder = saved / NAME / "1.0.0"
    for path in sorted(folder.iterdir()):
        original = path.read_bytes()
        for position in (0, len(original) // 2, len(original) - 2):
            changed = bytearray(original)
            changed[position] ^= 0x01
            path.write_bytes(bytes(changed))
            with pytest.raises(ModelStoreError, match=re.escape(path.name)):
                load_model(NAME, "1.0.0", root=saved)
        path.write_bytes(original)
    load_model(NAME, "1.0.0", root=saved)


def test_missing_and_unlisted_files_are_refused(saved: Path) -> None:
    folder = saved / NAME / "1.0.0"
    (folder / "notes.txt").write_text("hello")
    with pytest.raises(ModelStoreError, match=r"notes\.txt not listed"):
        load_model(NAME, "1.0.0", root=saved)
    (folder / "notes.txt").unlink()
    (folder / "cnn.safetensors").unlink()
    with pytest.raises(ModelStoreError, match=r"cnn\.safetensors"):
        load_model(NAME, "1.0.0", root=saved)


def test_incompatible_manifest_schema_is_refused(saved: Path) -> None:
    folder = saved / NAME / "1.0.0"
    manifest = read_manifest(folder)
    write_manifest(folder, {**manifest, "schema_version": 2})
    with pytest.raises(ModelStoreError, match=r"manifest\.json: manifest schema version 2"):
        load_model(NAME, "1.0.0", root=saved)
    legacy = {k: v for k, v in manifest.items() if k not in {"schema_version", "manifest_sha256"}}
    (folder / MANIFEST).write_text(json.dumps(legacy))
    with pytest.raises(ModelStoreError, match="schema version None"):
        load_model(NAME, "1.0.0", root=saved)
    write_manifest(folder, {**manifest, "kind": "threshold baseline"})
    with pytest.raises(ModelStoreError, match="is not 'trained model'"):
        load_model(NAME, "1.0.0", root=saved)
    write_manifest(folder, {k: v for k, v in manifest.items() if k != "cutoffs"})
    with pytest.raises(ModelStoreError, match="lacks 'cutoffs'"):
        load_model(NAME, "1.0.0", root=saved)


def test_untrusted_types_are_refused(tmp_path: Path) -> None:
    features, y = cohort()
    sneaky = Sneaky().fit(features.matrix(), y)
    record = TrainingRecord(
        recipe={},
        feature_names=features.column_names,
        training_data_hash="0" * 64,
        metrics={},
        cutoffs={},
        primary="model",
    )
    with pytest.raises(UntrustedTypesError, match=r"model\.skops: .*test_artefacts\.Sneaky"):
        save_model(NAME, "1.0.0", {"model": sneaky}, record, root=tmp_path)
    assert not (tmp_path / NAME / "1.0.0").exists()

    folder = tmp_path / NAME / "1.0.0"
    folder.mkdir(parents=True)
    data = sio.dumps(sneaky)
    (folder / "model.skops").write_bytes(data)
    manifest = {
        "name": NAME,
        "version": "1.0.0",
        "kind": "trained model",
        "provenance": SYNTHETIC_NOTICE,
        "created": "2025-01-01T00:00:00+00:00",
        "recipe": {},
        "feature_names": [],
        "training_data_hash": "0" * 64,
        "metrics": {},
        "notice": SYNTHETIC_NOTICE,
        "primary": "model",
        "cutoffs": {},
        "files": {"model.skops": {"sha256": sha256_hex(data), "format": "skops"}},
    }
    write_manifest(folder, manifest)
    with pytest.raises(UntrustedTypesError, match=r"model\.skops: .*Sneaky.*refusing"):
        load_model(NAME, "1.0.0", root=tmp_path)


def test_trusted_types_are_the_projects_estimators_and_named_internals() -> None:
    trusted = trusted_types()
    assert "pipelines.selection.lasso.LassoSelector" in trusted
    assert "pipelines.selection.univariate.AnovaFilter" in trusted
    assert "sklearn.neighbors._kd_tree.KDTree" in trusted
    assert not any(name.startswith(("builtins.", "os.", "subprocess.")) for name in trusted)


def test_versions_latest_promoted_and_immutable(
    saved: Path, fitted: tuple[FeatureBlocks, NDArray[np.int64], dict[str, Any], ModelRecipe]
) -> None:
    features, y, models, recipe = fitted
    record = record_for(features, y, recipe)
    small = {"combined": models["combined"], "clinical": models["clinical"]}
    for version in ("1.10.0", "1.9.2"):
        save_model(NAME, version, small, record, root=saved)
    assert list_versions(NAME, root=saved) == ["1.0.0", "1.9.2", "1.10.0"]
    assert select_version(NAME, root=saved) == "1.10.0"
    assert load_model(NAME, root=saved).version == "1.10.0"
    promote(NAME, "1.9.2", root=saved)
    assert select_version(NAME, root=saved) == "1.9.2"
    assert load_model(NAME, root=saved).version == "1.9.2"
    with pytest.raises(ModelStoreError, match="immutable"):
        save_model(NAME, "1.9.2", small, record, root=saved)
    with pytest.raises(ModelStoreError, match="not dot-separated integers"):
        save_model(NAME, "latest", small, record, root=saved)
    with pytest.raises(ModelStoreError, match="primary estimator"):
        save_model(NAME, "2.0.0", {"clinical": models["clinical"]}, record, root=saved)
    tampered = saved / NAME / "1.0.0" / "clinical.skops"
    tampered.write_bytes(tampered.read_bytes() + b"\0")
    with pytest.raises(ModelStoreError, match=r"clinical\.skops"):
        promote(NAME, "1.0.0", root=saved)
    assert list_versions("no_such_model", root=saved) == []
    with pytest.raises(ModelStoreError, match="no stored version"):
        select_version("no_such_model", root=saved)


def test_training_data_hash_definition() -> None:
    table = b"case_id,label\nA,1\nB,0\n"
    expected = hashlib.sha256(b"A\nB\n\0" + table).hexdigest()
    assert training_data_hash(["B", "A"], table) == expected
    assert training_data_hash(["A", "B"], table + b"C,1\n") != expected
    assert training_data_hash(["A", "C"], table) != expected
    assert label_table_bytes(["B", "A"], [np.int64(0), 1]) == table
    with pytest.raises(ValueError, match="unique"):
        training_data_hash(["A", "A"], table)
    with pytest.raises(ValueError, match="line feed"):
        training_data_hash(["A\nB"], table)


def test_threshold_baseline_uses_the_same_checks(tmp_path: Path) -> None:
    shutil.copytree(STORE_ROOT / "hyperdense_threshold", tmp_path / "hyperdense_threshold")
    assert load_parameters("hyperdense_threshold", "1.0.0", root=tmp_path)["low_hu"] == 55.0
    path = tmp_path / "hyperdense_threshold" / "1.0.0" / MANIFEST
    path.write_text(path.read_text().replace("fixed thresholds", "fixed-thresholds"))
    with pytest.raises(ModelStoreError, match=r"manifest\.json: the manifest's sha256"):
        load_parameters("hyperdense_threshold", "1.0.0", root=tmp_path)
    with pytest.raises(ModelStoreError, match="is not 'trained model'"):
        load_model("hyperdense_threshold", "1.0.0", root=STORE_ROOT)
