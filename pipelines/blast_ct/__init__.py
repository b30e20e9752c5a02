"""BLAST-CT v1: the pretrained DeepMedic ensemble for traumatic and haemorrhagic lesions."""

from pipelines.blast_ct.pipeline import BlastCtParameters, BlastCtPipeline

__all__ = ["BlastCtParameters", "BlastCtPipeline"]
