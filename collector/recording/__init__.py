"""The recording: the collector's durable log, and the tools that read it back.

``format`` (the layout), ``writer`` (append, flush, survive a full disk), ``reader`` (every
intact record, in order), ``scan`` (both in bulk, in numba), ``inspect`` (per-rank counts).
"""
