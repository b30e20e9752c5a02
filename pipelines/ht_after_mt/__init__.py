"""HT after thrombectomy (Jiang et al., Sci Rep 2025): fused clinical, radiomics and CNN
risk model; features, training, the stored model and the ``ht_after_mt`` pipeline."""

from pipelines.ht_after_mt.pipeline import HtAfterMtPipeline

__all__ = ["HtAfterMtPipeline"]
