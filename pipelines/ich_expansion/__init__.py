"""Pipeline ``ich_expansion``: haematoma expansion from the admission NCCT of a
spontaneous ICH (Lee et al. 2024): slice classifier and segmenter, area-weighted
per-slice expansion score (nDL), forward-selected clinical model and the integrated
model, compared by likelihood-ratio test and AIC."""
