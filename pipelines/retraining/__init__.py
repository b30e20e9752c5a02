"""Retraining: the trainable-model protocol, the promotion gate and the report.

The retraining service (``dicomnode.retrain``) calls these; nothing here touches the
network or the node's state.
"""
