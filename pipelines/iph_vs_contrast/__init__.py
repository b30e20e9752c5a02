"""IPH vs iodinated contrast staining after thrombectomy (Eur Radiol, 4 centres): every
intraparenchymal hyperdense area classified by a radiomics Rad-score; the per-area
synthetic cohort, features, training, the stored model and the ``iph_vs_contrast``
pipeline."""

from pipelines.iph_vs_contrast.pipeline import IphVsContrastPipeline

__all__ = ["IphVsContrastPipeline"]
