"""Outcome labels from follow-up imaging: link a follow-up CT to its baseline, register
it, and derive HT persistence, haematoma expansion and contrast clearance with evidence
and a confidence (:mod:`pipelines.followup.derive`); generated baseline/follow-up pairs
with known truth (:mod:`pipelines.followup.pairs`)."""
