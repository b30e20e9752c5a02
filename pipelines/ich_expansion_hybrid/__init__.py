"""Pipeline ``ich_expansion_hybrid``: haematoma expansion from automatic segmentation,
radiomics and frozen CNN features (Lu et al., Diagn Interv Radiol 2024)."""
