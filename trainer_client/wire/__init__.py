"""The wire format: the one contract the trainer client and the collector share.

A message is a ZeroMQ multipart message: frame 0 is a msgpack *array* (positional, not a
map: a map header costs several microseconds more to unpack, and replay speed rides on
this), the other frames are raw tensor bytes described by the header. Nothing is ever
pickled or evaluated; every field is type-checked and every tensor's declared size is held
against its frame's real size.

Header layout (index: field)::

    0 version   1 kind      2 run       3 rank      4 world_size  5 instance
    6 seq       7 step      8 epoch     9 wall_time 10 dropped    11 body
    12 tensors: [[name, dtype, [dims...]], ...]  (one per extra frame, in order)

Step messages, the hot kind, have their own single-frame binary layout (``STEP_LAYOUT``):
fixed-width little-endian fields, so the collector parses thousands at once in compiled
code instead of unpacking one header at a time. Its first byte is 0xC1, which msgpack
never uses, so the two layouts cannot be confused. A step in the msgpack layout (a
recording made before the binary one) is still read.

``instance`` is random per client object, so a restarted rank starts a new sequence.
``dropped`` counts this client's messages with a lower ``seq`` that never left it, so the
collector can tell transport loss from reported loss exactly.

Importable without torch or numpy: the collector runs on a login node without torch.

    >>> frames = encode(Header(KIND_STEP, "run1", 0, 1, 7, 0, 0, 1, 0.0, 0,
    ...                        [0.5, 1.2, [], [], None]), [])
    >>> decode(frames).body[0]
    0.5

``types`` (kinds, dtypes, limits, the message tuples), ``step`` (the binary step layout),
``bodies`` (per-kind checks), ``codec`` (``encode`` / ``decode``).
"""

from trainer_client.wire.codec import decode, encode
from trainer_client.wire.step import (
    STEP_BODY,
    STEP_FIELDS,
    STEP_FLAGS,
    STEP_HAS_GN,
    STEP_HAS_LR,
    STEP_HAS_PN,
    STEP_LAYOUT,
    STEP_LAYOUT_V1,
    STEP_MAGIC,
    STEP_TAG,
    STEP_VERSION,
    encode_step,
    step_names,
)
from trainer_client.wire.types import (
    DTYPES,
    EMA_FIELDS,
    FLOAT_DTYPES,
    KIND_BYE,
    KIND_CONFIG,
    KIND_DATA,
    KIND_EPOCH,
    KIND_HELLO,
    KIND_STEP,
    KIND_VALIDATION,
    KINDS,
    MAX_DIMS,
    MAX_RUN_LEN,
    MAX_WORLD,
    VERSION,
    WEIGHT_FIELDS,
    DecodeError,
    Header,
    Message,
    Tensor,
)

__all__ = ["DTYPES", "EMA_FIELDS", "FLOAT_DTYPES", "KINDS", "KIND_BYE", "KIND_CONFIG",
           "KIND_DATA", "KIND_EPOCH", "KIND_HELLO", "KIND_STEP", "KIND_VALIDATION", "MAX_DIMS",
           "MAX_RUN_LEN", "MAX_WORLD", "STEP_BODY", "STEP_FIELDS", "STEP_FLAGS", "STEP_HAS_GN",
           "STEP_HAS_LR", "STEP_HAS_PN", "STEP_LAYOUT", "STEP_LAYOUT_V1", "STEP_MAGIC",
           "STEP_TAG", "STEP_VERSION", "VERSION", "WEIGHT_FIELDS", "DecodeError", "Header",
           "Message", "Tensor", "decode", "encode", "encode_step", "step_names"]
