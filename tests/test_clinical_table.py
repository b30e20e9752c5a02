"""The clinical table fails open: whatever is wrong with it, the HT risk is still computed,
the imaging results stay, and every imputed variable is listed with its reason (SR, SC),
with no patient identifier in those texts."""

from __future__ import annotations

import codecs
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
import torch
from pydicom.dataset import Dataset

from model_store.registry import load_manifest
from pipelines.base import ClinicalIssue, RiskPrediction
from pipelines.cohort import Cohort, generate_cohort
from pipelines.ht_after_mt import HtAfterMtPipeline
from pipelines.ht_after_mt.clinical import (
    ABSENT,
    DUPLICATE_ROWS,
    EMPTY,
    NO_ROW,
    NO_TABLE,
    NOT_A_VALUE,
    PLAUSIBLE_RANGES,
    ClinicalTable,
    ClinicalTableError,
    ClinicalValues,
    RowLookup,
    checked_header_age,
    detect_delimiter,
    screen_clinical,
)
from pipelines.ht_after_mt.features import CLINICAL_VARIABLES, TABLE_VARIABLES, ImputationPolicy
from pipelines.ht_after_mt.model import MODEL_NAME
from pipelines.outputs import build_outputs
from pipelines.outputs.common import risk_lines
from pipelines.series import LoadedSeries
from pipelines.volume import load_datasets
from tests.dciodvfy import dciodvfy_errors
from tests.support import require_tool

ACCESSION, PATIENT, DATE = "ACC-7781", "PID-55501", "20240801"
OTHER = "ACC-0002"
IDENTIFIERS = (ACCESSION, PATIENT, DATE, "2024-08-01", OTHER)
GOOD = {
    "age": "70",
    "sex_male": "M",
    "hypertension": "yes",
    "diabetes": "0",
    "atrial_fibrillation": "no",
    "coronary_artery_disease": "0",
    "hyperlipidaemia": "1",
    "smoking": "0",
    "drinking": "0",
    "nihss": "14",
    "aspects": "8",
    "thrombolysis": "1",
    "anterior_circulation": "1",
    "glucose_mmol_l": "7.2",
    "onset_to_recanalisation_min": "300",
    "pass_number": "2",
    "mtici_2b_or_better": "1",
    "aspiration_catheter": "0",
    "stent_implantation": "0",
}


def study(age: str | None = None, birth: str | None = None) -> Dataset:
    """A study header: keys of the table's first row, optional PatientAge / birth date."""
    ds = Dataset()
    ds.AccessionNumber, ds.PatientID, ds.StudyDate = ACCESSION, PATIENT, DATE
    if age is not None:
        ds.PatientAge = age
    if birth is not None:
        ds.PatientBirthDate = birth
    return ds


def write_table(
    path: Path,
    rows: list[dict[str, str]],
    delimiter: str = ",",
    encoding: str = "utf-8",
) -> Path:
    """A CSV table: keys then clinical columns (those of the first row), one row each."""
    columns = ["AccessionNumber", "PatientID", "StudyDate", *rows[0]]
    lines = [delimiter.join(columns)]
    for number, row in enumerate(rows):
        keys = [ACCESSION, PATIENT, DATE] if number == 0 else [f"ACC-{number:04d}", "P", DATE]
        lines.append(delimiter.join([*keys, *(row.get(c, "") for c in columns[3:])]))
    path.write_bytes(("\n".join(lines) + "\n").encode(encoding))
    return path


def screened(path: Path, ds: Dataset | None = None) -> ClinicalValues:
    """The study's clinical values from the table at ``path`` (lenient, as the node)."""
    ds = ds or study()
    return screen_clinical(ds, ClinicalTable.read(path, strict=False).find_dataset(ds))


def reasons(values: ClinicalValues) -> dict[str, str]:
    """Variable -> reason, for the imputed ones."""
    return {i.variable: i.reason for i in values.issues if i.imputed}


def assert_no_identifiers(texts: list[str]) -> None:
    """None of the study's key values appears in ``texts``."""
    for text in texts:
        for value in IDENTIFIERS:
            assert value not in text, (value, text)


# --- cells, rows, delimiters -------------------------------------------------------------


def test_a_good_row_gives_every_variable(tmp_path: Path) -> None:
    values = screened(write_table(tmp_path / "t.csv", [GOOD]))
    assert values.missing == () and values.issues == ()
    assert values.values["nihss"] == 14.0 and values.values["sex_male"] == 1.0
    assert values.values["glucose_mmol_l"] == 7.2


@pytest.mark.parametrize(
    ("variable", "cell", "reason"),
    [
        ("nihss", "99", "value 99 outside plausible range 0-42"),
        ("nihss", "-1", "value -1 outside plausible range 0-42"),
        ("nihss", "12.5", "value 12.5 is not a whole number (0-42)"),
        ("nihss", "severe", NOT_A_VALUE),
        ("aspects", "11", "value 11 outside plausible range 0-10"),
        ("age", "250", "not in the header; value 250 outside plausible range 0-120 years"),
        ("glucose_mmol_l", "126", "value 126 outside plausible range 1-50 mmol/L"),
        ("glucose_mmol_l", "inf", "value inf outside plausible range 1-50 mmol/L"),
        ("onset_to_recanalisation_min", "1e308", "value 1e+308 outside plausible range 0-2880"),
        ("pass_number", "-2", "value -2 outside plausible range 0-20"),
        ("diabetes", "2", "value 2 outside plausible range 0-1 (no/yes)"),
        ("smoking", "NA", EMPTY),
        ("drinking", "", EMPTY),
    ],
)
def test_a_bad_cell_imputes_only_its_variable_with_the_reason(
    tmp_path: Path, variable: str, cell: str, reason: str
) -> None:
    values = screened(write_table(tmp_path / "t.csv", [GOOD | {variable: cell}]))
    assert values.missing == (variable,)
    assert list(reasons(values)) == [variable]
    assert reasons(values)[variable].startswith(reason)
    assert_no_identifiers([i.reason for i in values.issues])


def test_every_variable_has_a_documented_range() -> None:
    assert set(PLAUSIBLE_RANGES) == set(CLINICAL_VARIABLES)
    assert (PLAUSIBLE_RANGES["nihss"].low, PLAUSIBLE_RANGES["nihss"].high) == (0.0, 42.0)
    assert (PLAUSIBLE_RANGES["aspects"].low, PLAUSIBLE_RANGES["aspects"].high) == (0.0, 10.0)


@pytest.mark.parametrize(
    ("delimiter", "glucose", "expected"),
    [(";", "7,2", 7.2), ("\t", "7,2", 7.2), (";", "7.2", 7.2), ("\t", "7.2", 7.2)],
)
def test_semicolon_and_tab_delimiters_and_decimal_commas_are_read(
    tmp_path: Path, delimiter: str, glucose: str, expected: float
) -> None:
    path = write_table(tmp_path / "t.csv", [GOOD | {"glucose_mmol_l": glucose}], delimiter)
    assert detect_delimiter(path.read_text(encoding="utf-8")) == delimiter
    values = screened(path)
    assert values.missing == ()
    assert values.values["glucose_mmol_l"] == expected


def test_a_comma_inside_a_comma_separated_cell_is_not_a_decimal(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    header = ",".join(["AccessionNumber", "PatientID", "StudyDate", *GOOD])
    quoted = (f'"{v}"' for v in (GOOD | {"glucose_mmol_l": "7,2"}).values())
    cells = [ACCESSION, PATIENT, DATE, *quoted]
    path.write_text(header + "\n" + ",".join(cells) + "\n", encoding="utf-8")
    assert reasons(screened(path)) == {"glucose_mmol_l": NOT_A_VALUE}


def test_excel_unicode_text_and_case_insensitive_headers_are_read(tmp_path: Path) -> None:
    path = write_table(tmp_path / "t.txt", [GOOD], "\t", "utf-16")
    assert path.read_bytes().startswith(codecs.BOM_UTF16_LE)
    assert screened(path).missing == ()
    upper = tmp_path / "upper.csv"
    upper.write_text(
        f"accessionnumber,PATIENTID,studydate,NIHSS\n{ACCESSION},{PATIENT},{DATE},9\n",
        encoding="utf-8",
    )
    values = screened(upper)
    assert values.values["nihss"] == 9.0
    assert reasons(values)["aspects"] == ABSENT


def test_duplicate_rows_for_a_study_impute_its_table_variables(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    write_table(path, [GOOD, GOOD])
    text = path.read_text(encoding="utf-8")
    path.write_text(text + f"{ACCESSION},{PATIENT},{DATE}," + ",".join(GOOD.values()) + "\n")
    values = screened(path)
    assert set(values.missing) == set(CLINICAL_VARIABLES)
    assert {reasons(values)[name] for name in TABLE_VARIABLES} == {DUPLICATE_ROWS}
    other = study()
    other.AccessionNumber = "ACC-0001"  # the second row: unique, still used
    assert screened(path, other).missing == ()
    with pytest.raises(ClinicalTableError) as refused:
        ClinicalTable.read(path)  # strict (training): refused, without the key's value
    assert str(refused.value).endswith("rows 1 and 3 have the same AccessionNumber")
    assert ACCESSION not in str(refused.value)


def test_a_malformed_row_is_not_used_and_the_others_are(tmp_path: Path) -> None:
    path = write_table(tmp_path / "t.csv", [GOOD, GOOD])
    lines = path.read_text(encoding="utf-8").splitlines()
    lines[1] += ",surplus"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    values = screened(path)
    assert set(values.missing) == set(CLINICAL_VARIABLES)
    reason = reasons(values)["nihss"]
    assert reason == "the row for this study is malformed: it has 23 cells where the header has 22"
    other = study()
    other.AccessionNumber = "ACC-0001"
    assert screened(path, other).missing == ()
    with pytest.raises(ClinicalTableError, match="row 1 is malformed"):
        ClinicalTable.read(path)


def test_no_row_and_no_table_impute_every_table_variable(tmp_path: Path) -> None:
    path = write_table(tmp_path / "t.csv", [GOOD])
    ds = study(age="071Y")
    ds.AccessionNumber, ds.PatientID = "ACC-9999", "someone else"
    values = screened(path, ds)
    assert set(values.missing) == set(CLINICAL_VARIABLES) - {"age"}
    assert {reasons(values)[name] for name in TABLE_VARIABLES} == {NO_ROW}
    assert reasons(values)["sex_male"] == f"not in the header; {NO_ROW}"
    none = screen_clinical(study(), RowLookup(None, NO_TABLE))
    assert {reasons(none)[name] for name in TABLE_VARIABLES} == {NO_TABLE}
    assert reasons(none)["age"] == f"not in the header; {NO_TABLE}"


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        ("absent.csv", None, "file not found"),
        ("folder", "folder", "a folder, not a file"),
        ("latin1.csv", "AccessionNumber,nihss\nACC,\xe9\n".encode("latin-1"), "not UTF-8 text"),
        ("sheet.xlsx", b"PK\x03\x04\x00\x00binary", "a binary file, not a CSV or JSON table"),
        ("empty.csv", b"  \n", "the file is empty"),
        ("broken.json", b'{"rows": [', "not valid JSON"),
        ("shape.json", b'{"rows": 3}', "JSON is not a list of objects"),
        ("nokeys.csv", b"name,nihss\nx,3\n", "no row has an AccessionNumber"),
    ],
)
def test_a_table_that_cannot_be_read_says_why_without_its_contents(
    tmp_path: Path, name: str, content: bytes | str | None, reason: str
) -> None:
    path = tmp_path / name
    if content == "folder":
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    with pytest.raises(ClinicalTableError) as error:
        ClinicalTable.read(path, strict=False)
    assert error.value.reason.startswith(reason)
    assert str(path) not in error.value.reason and str(path) in str(error.value)


# --- header age -----------------------------------------------------------------------------


def test_header_age_is_checked_and_the_table_age_replaces_an_implausible_one(
    tmp_path: Path,
) -> None:
    path = write_table(tmp_path / "t.csv", [GOOD])
    values = screened(path, study(age="250Y"))
    assert values.values["age"] == 70.0 and values.missing == ()
    assert values.issues == (
        ClinicalIssue(
            "age",
            "header PatientAge: value 250 outside plausible range 0-120 years; "
            "the clinical table's value used",
            imputed=False,
        ),
    )
    both_bad = screened(write_table(tmp_path / "u.csv", [GOOD | {"age": "300"}]), study("250Y"))
    assert both_bad.missing == ("age",)
    assert reasons(both_bad)["age"] == (
        "header PatientAge: value 250 outside plausible range 0-120 years; "
        "table: value 300 outside plausible range 0-120 years"
    )
    assert checked_header_age(study(age="071Y")) == (71.0, None)
    assert checked_header_age(study(age="006M")) == (0.5, None)
    assert checked_header_age(study(age="71")) == (
        None,
        "header PatientAge is not a DICOM age string (nnnY/M/W/D)",
    )


def test_age_from_the_birth_date_is_checked_and_the_date_never_quoted() -> None:
    age, problem = checked_header_age(study(birth="19540301"))
    assert problem is None and age == pytest.approx(70.4, abs=0.1)
    age, problem = checked_header_age(study(birth="20300101"))  # born after the study
    assert age is None and problem is not None
    assert problem.startswith("age from the header's birth date: value -5.")
    assert "2030" not in problem and "20300101" not in problem
    assert checked_header_age(study()) == (None, None)


# --- imputation, outputs ----------------------------------------------------------------------


def test_the_bundled_models_policy_fills_exactly_the_missing_ones(tmp_path: Path) -> None:
    manifest = load_manifest(MODEL_NAME, "1.0.0")
    policy = ImputationPolicy.from_dict(manifest["imputation"])
    bad = GOOD | {"nihss": "99", "glucose_mmol_l": "abc", "diabetes": ""}
    values = screened(write_table(tmp_path / "t.csv", [bad]), study(age="250Y"))
    filled, imputed = policy.apply(values.values)
    assert set(imputed) == {"nihss", "glucose_mmol_l", "diabetes"}
    assert all(v == v for v in filled)  # no NaN reaches the model
    assert filled[CLINICAL_VARIABLES.index("nihss")] == policy.values["nihss"]


def test_risk_lines_group_the_imputed_variables_by_reason() -> None:
    issues = [ClinicalIssue(name, NO_ROW) for name in TABLE_VARIABLES[:3]]
    issues += [ClinicalIssue("nihss", "value 99 outside plausible range 0-42")]
    issues += [ClinicalIssue("age", "header PatientAge: value 250 ...", imputed=False)]
    risk = RiskPrediction(
        "haemorrhagic transformation", 0.4, 0.5, "m", "1", "notice",
        imputed=(*TABLE_VARIABLES[:3], "nihss", "aspects"), clinical_issues=issues,
    )  # fmt: skip
    lines = risk_lines_text(risk)
    assert (
        "Imputed clinical variables (training median/mode): hypertension, diabetes, "
        f"atrial_fibrillation ({NO_ROW}); nihss (value 99 outside plausible range 0-42); "
        "aspects (missing)"
    ) in lines
    assert "Clinical data notes: age: header PatientAge: value 250 ..." in lines


def risk_lines_text(risk: RiskPrediction) -> list[str]:
    """The risk lines the SR and SC show for ``risk`` (through a minimal result)."""
    from pipelines.base import Algorithm, PipelineResult

    algorithm = Algorithm("a", "1", "trained risk model", "p")
    return risk_lines(PipelineResult(algorithm, [], 0, risk=risk))


# --- the whole pipeline with the bundled model -------------------------------------------------


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tests share two cores with other work: one torch thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory, one_thread: None) -> Cohort:
    """One generated post-thrombectomy case with a lesion, and its clinical table."""
    return generate_cohort(tmp_path_factory.mktemp("clinical-case"), 1, 5, rows=96)


@pytest.fixture(scope="module")
def pipeline() -> HtAfterMtPipeline:
    """The bundled model, loaded once."""
    pipeline = HtAfterMtPipeline()
    pipeline.check()
    return pipeline


def series_with(case: Cohort, age: str) -> LoadedSeries:
    """The case's series with PatientAge ``age``."""
    datasets = [pydicom.dcmread(p) for p in sorted(case.cases[0].folder.glob("*.dcm"))]
    for ds in datasets:
        ds.PatientAge = age
    return load_datasets(datasets)


def output_texts(
    series: LoadedSeries, pipeline: HtAfterMtPipeline, folder: Path | None = None
) -> list[str]:
    """The SR's TEXT values after a run (the SC's text panel draws the same lines, from
    ``risk_lines``); asserts that the SEG and the SC are made too, and with ``folder``
    that the SR and SC pass dciodvfy."""
    result = pipeline.run(series)
    assert result.risk is not None and 0.0 <= result.risk.probability <= 1.0
    assert result.segments[0].total is not None  # the imaging result is kept
    outputs = build_outputs(series, result, pipeline_name="ht_after_mt")
    modalities = [str(ds.Modality) for ds in outputs]
    assert modalities[:3] == ["SEG", "OT", "SR"]
    if folder is not None:
        require_tool("dciodvfy", "dicom3tools")
        for ds in outputs[1:3]:
            path = folder / f"{ds.Modality}.dcm"
            ds.save_as(path, enforce_file_format=True)
            assert dciodvfy_errors(path) == [], ds.Modality
    texts = [
        str(item.TextValue)
        for item in outputs[2].ContentSequence[-1].ContentSequence
        if "TextValue" in item
    ]
    return texts


def test_a_bad_table_row_still_gives_the_risk_and_the_sr_says_why(
    case: Cohort, pipeline: HtAfterMtPipeline, tmp_path: Path
) -> None:
    series = series_with(case, "250Y")
    ds = series.reference
    rows = [GOOD | {"nihss": "99", "glucose_mmol_l": "6,9"}]
    path = write_table(tmp_path / "t.csv", rows, ";")
    text = path.read_text(encoding="utf-8").replace(ACCESSION, str(ds.AccessionNumber))
    path.write_text(text.replace(PATIENT, str(ds.PatientID)), encoding="utf-8")
    pipeline.clinical_table = path
    texts = output_texts(series, pipeline, tmp_path)
    joined = "\n".join(texts)
    assert "nihss (value 99 outside plausible range 0-42)" in joined
    assert "age: header PatientAge: value 250 outside plausible range 0-120 years" in joined
    assert "glucose" not in joined  # 6,9 read as 6.9 from the semicolon table
    identifiers = [str(ds.get(k, "")) for k in ("AccessionNumber", "PatientID", "PatientName")]
    for value in filter(None, identifiers):
        assert value not in joined


def test_an_unreadable_table_never_removes_the_imaging_results(
    case: Cohort, pipeline: HtAfterMtPipeline, tmp_path: Path
) -> None:
    pipeline.clinical_table = tmp_path / "gone.csv"
    texts = output_texts(series_with(case, "070Y"), pipeline)
    line = next(t for t in texts if t.startswith("Imputed clinical variables"))
    assert "(clinical table unreadable: file not found)" in line
    assert str(tmp_path) not in line
    assert all(name in line for name in TABLE_VARIABLES)
