"""The training-side half of trainwatch: ship tensors to the collector, never block.

    from trainer_client import TrainerClient

    with TrainerClient() as tw:          # endpoint from TRAINWATCH_ENDPOINT
        for epoch in range(1, epochs + 1):
            for batch in loader:
                loss, terms = step(batch)
                tw.log_step(loss, terms, model=model, grad_norm=clip_norm)
            tw.log_epoch(epoch, model=model, ema_model=ema)

``trainer_client.wire`` is importable without torch (the collector uses it); the client
itself is imported lazily so that importing the wire module never pulls torch in.
"""

from typing import TYPE_CHECKING, Any

__all__ = ["TrainerClient"]

if TYPE_CHECKING:
    from .client import TrainerClient


def __getattr__(name: str) -> Any:
    if name == "TrainerClient":
        from .client import TrainerClient

        return TrainerClient
    raise AttributeError(f"module 'trainer_client' has no attribute {name!r}")
