"""Analysis: closed epochs in, metrics, flags and events out; no I/O.

``inputs`` (what the state hands over), ``kernels`` and ``datastats`` (numba moments),
``stats`` (the guide's per-epoch metrics), ``rules`` (the profile's conditions), ``health``
(one run: metrics, flags, events, summary), ``profile`` and ``profiles/*.toml`` (rules as data).
"""
