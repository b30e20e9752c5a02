"""Versioned model artefacts (parameters, weights) with manifests that pin their hashes."""
