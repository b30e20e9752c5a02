"""Clinical imaging pipelines: volume loading, segmentation, measurements, DICOM outputs.

This package is pure imaging and ML. It never imports the network or service layer
(``dicomnode``); the service calls into it.
"""
