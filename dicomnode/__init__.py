"""dicomnode service layer: receive, spool, assemble and route, queue, run, send.

This package never imports ``pipelines``; the pipeline is handed to :class:`Node` as a
callable by whoever composes the application.
"""
