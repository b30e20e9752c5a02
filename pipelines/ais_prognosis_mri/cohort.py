"""Synthetic cohort for ``ais_prognosis_mri``: MRI studies of acute ischaemic stroke with
clinical variables and a discharge outcome (mRS 3-6 = poor) drawn from a documented model.

Generative model (one case, seed ``[cohort seed, case index]``):

- Field strength 1.5 T or 3 T (1:1); infarct volume ``V`` log-normal (median 12 mL,
  log-SD 0.8, clipped to 1.5-80 mL); ``severity`` uniform 0-1 (ADC drop, see
  :mod:`.synthetic_mri`); onset-to-MRI 1-12 h (FLAIR visibility); centre in either middle
  cerebral artery territory (lateral 20-42 mm, antero-posterior -30..25 mm, -10..10 mm
  from the slab centre); elongation 0.7-1.3 per axis.
- NIHSS = clip(round(2 + 4.5 ln(1 + V / 2 mL) + N(0, 4)), 0, 42): larger infarcts, worse
  deficits. ICH (intracranial haemorrhage) ~ Bernoulli(0.18), independent of the image.
- Outcome: poor (mRS 3-6) ~ Bernoulli(sigmoid(lp)), with the linear predictor
  ``lp = -0.4 + 0.12 (NIHSS - 10) + 1.4 ICH + 0.8 ln(V / 12 mL) + 2.4 (severity - 0.5)``
  (:data:`OUTCOME_MODEL`): clinical variables and the image (volume and the depth of the
  ADC drop, the image-borne signal) each carry information the other lacks. The oracle
  AUC is that of ``lp`` itself on the held-out cases.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipelines.ais_prognosis_mri.synthetic_mri import FIELD_STRENGTHS_T, Infarct, StudySpec

GENERATOR_VERSION = "1.0.0"
OUTCOME_MODEL = {
    "intercept": -0.4,
    "nihss_per_point": 0.12,
    "nihss_centre": 10.0,
    "ich": 1.4,
    "log_volume_per_e": 0.8,
    "volume_centre_ml": 12.0,
    "severity": 2.4,
}
ICH_RATE = 0.18
VOLUME_MEDIAN_ML = 12.0
VOLUME_LOG_SD = 0.8
VOLUME_RANGE_ML = (1.5, 80.0)


@dataclass(frozen=True)
class CohortCase:
    """One generated case: the study to draw, its clinical variables and its outcome."""

    case_id: str
    spec: StudySpec
    nihss: int
    ich: int
    linear_predictor: float
    poor_outcome: int

    @property
    def clinical(self) -> dict[str, float]:
        """The clinical variables the model reads."""
        return {"nihss": float(self.nihss), "ich": float(self.ich)}


def linear_predictor(nihss: float, ich: float, volume_ml: float, severity: float) -> float:
    """The generative model's log-odds of a poor outcome (:data:`OUTCOME_MODEL`)."""
    m = OUTCOME_MODEL
    return float(
        m["intercept"]
        + m["nihss_per_point"] * (nihss - m["nihss_centre"])
        + m["ich"] * ich
        + m["log_volume_per_e"] * np.log(volume_ml / m["volume_centre_ml"])
        + m["severity"] * (severity - 0.5)
    )


def draw_case(seed: int, index: int, rows: int = 64, n_slices: int = 16) -> CohortCase:
    """Case ``index`` of the cohort of ``seed``."""
    rng = np.random.default_rng([seed, index])
    volume = float(
        np.clip(np.exp(np.log(VOLUME_MEDIAN_ML) + VOLUME_LOG_SD * rng.normal()), *VOLUME_RANGE_ML)
    )
    side = 1.0 if rng.random() < 0.5 else -1.0
    centre = (
        side * rng.uniform(20.0, 42.0),
        rng.uniform(-30.0, 25.0),
        rng.uniform(-10.0, 10.0),
    )
    infarct = Infarct(
        centre_mm=centre,
        volume_ml=volume,
        elongation=tuple(float(v) for v in rng.uniform(0.7, 1.3, 3)),  # type: ignore[arg-type]
        severity=float(rng.uniform(0.0, 1.0)),
        onset_h=float(rng.uniform(1.0, 12.0)),
    )
    nihss = int(np.clip(round(2 + 4.5 * np.log(1 + volume / 2.0) + rng.normal(0, 4)), 0, 42))
    ich = int(rng.random() < ICH_RATE)
    lp = linear_predictor(nihss, ich, volume, infarct.severity)
    poor = int(rng.random() < 1.0 / (1.0 + np.exp(-lp)))
    spec = StudySpec(
        seed=seed * 100_000 + index,
        infarct=infarct,
        field_strength_t=float(FIELD_STRENGTHS_T[int(rng.integers(0, 2))]),
        rows=rows,
        n_slices=n_slices,
        patient_age=int(np.clip(rng.normal(70, 10), 30, 95)),
        patient_sex="M" if rng.random() < 0.55 else "F",
    )
    return CohortCase(f"mri-{seed}-{index:04d}", spec, nihss, ich, lp, poor)


def draw_cohort(seed: int, n_cases: int, rows: int = 64, n_slices: int = 16) -> list[CohortCase]:
    """``n_cases`` cases of the cohort of ``seed``."""
    return [draw_case(seed, i, rows, n_slices) for i in range(n_cases)]
