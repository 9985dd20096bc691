"""Ingest: messages in, per-run state out.

``server`` (the socket loop), ``binds`` (which endpoints may be bound), ``auth`` (CURVE),
``forward`` (a node's relay), ``pipeline`` (the one path from frames to records, live and
replay), ``stepscan`` (binary steps in bulk, numba), ``state`` and ``columns`` (runs, ranks
and their open epochs), ``counters`` (per-stream message accounting).
"""
