"""TrainerClient: the training loop's whole interface to trainwatch.

Every ``log_*`` call does its arithmetic on the device, starts one asynchronous copy of
a small tensor to host memory and appends an item to a bounded queue. It never calls
``.item()``, ``.tolist()`` or a synchronous ``.cpu()``, never touches the socket and never
waits: when the collector is slow, absent or dead, messages are dropped and counted.

    tw = TrainerClient()                       # TRAINWATCH_ENDPOINT or tcp://127.0.0.1:5555
    tw.log_config(vars(args), model=model)
    for epoch in range(1, args.epochs + 1):
        for x in loader:
            loss, terms = compute_loss(model, x)
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            tw.log_step(loss, terms, model=model, grad_norm=norm)  # reads .grad: before
            opt.step()                                             # zero_grad
            opt.zero_grad()
        tw.log_epoch(epoch, model=model, ema_model=ema)
    tw.close()

Nothing here raises into the loop but a wrong argument (a ``ValueError`` or ``TypeError``
at the call): a parameter the reductions cannot take is left out with one warning, and a
call whose device work fails anyway is dropped, counted (``log_failed``) and logged once.

The collector's verdicts come back (``trainer_client.feedback``): ``tw.health``,
``tw.on_finding(callback)`` and ``tw.should_stop`` (break out of the loop when True: every
rank turns at the same step) read what the sender thread heard, without waiting.
"""

from __future__ import annotations

import itertools
import logging
import os
import random
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from . import identity, lifecycle, reductions, wire
from .curve import load_client_keys
from .feedback import Feedback, Finding, Health, HealthSocket
from .sender import CONNECT_WARN_S, FIRST_PEER_S, Item, Sender
from .steps import GradWatch, epoch_vector, host_step, step_vector, versions
from .tensors import (
    BadArgument,
    BadDtype,
    channel_axis,
    constants,
    data_chunks,
    dtype_name,
    plain,
    raw,
    sample_rows,
)

__all__ = ["TrainerClient"]

_log = logging.getLogger("trainwatch.client")

_CHUNK_BYTES = 8 << 20  # data-stats chunks: big enough to amortise, small enough to interleave
# log_data_stats ships at most this many rows (positions along every dim but the channel
# dim) by default: a uniform sample of 10^6 rows pins each channel's mean to ~0.1 % of its
# std, and a CIFAR-sized image set (5*10^7 pixel rows) would otherwise travel whole.
DATA_MAX_ROWS = 1_000_000
LOCAL_WAIT_S = 60.0  # a local collector's start-up (Python, numba) before it connects


class TrainerClient:
    """Ships training-health data to a trainwatch collector without blocking the loop.

    Endpoint: argument, else ``TRAINWATCH_ENDPOINT``, else ``tcp://127.0.0.1:5555``.
    Run id: argument, else ``TRAINWATCH_RUN``, else derived from the launcher so every
    rank agrees. Rank/world size: argument, else ``torch.distributed``, else ``RANK`` /
    ``WORLD_SIZE``, else 0/1. CURVE keys: argument or ``TRAINWATCH_CURVE_KEYS`` (a folder
    made by ``trainwatch keys generate``). ``local_collector=FOLDER``: with no endpoint
    configured, start a collector of this job's own that writes into FOLDER.
    Back-channel: ``health_endpoint``, else ``TRAINWATCH_HEALTH_ENDPOINT``, else beside the
    endpoint (tcp port + 1, ipc path + ``.health``); ``"none"``: none.
    ``console_findings``: raised findings are written on this process's console (logger
    ``trainwatch.client``, rate-limited).

    A malformed endpoint is a ``ValueError`` here, naming where it came from. After that
    nothing raises into the loop but a wrong argument to a ``log_*`` call.
    """

    def __init__(self, endpoint: str | None = None, run: str | None = None,
                 rank: int | None = None, world_size: int | None = None,
                 curve_keys: str | None = None, max_queue: int = 10_000,
                 max_queue_bytes: int = 1 << 30,
                 local_collector: str | os.PathLike[str] | None = None,
                 health_endpoint: str | None = None, console_findings: bool = True) -> None:
        self.run = identity.resolve_run(run)
        self.rank, self.world_size = identity.resolve_rank_world(rank, world_size)
        self._local = None
        self.endpoint = identity.resolve_endpoint(endpoint)  # a ValueError if malformed
        self.health_endpoint = identity.resolve_health_endpoint(health_endpoint, self.endpoint)
        curve = load_client_keys(curve_keys or os.environ.get("TRAINWATCH_CURVE_KEYS"))
        if local_collector is not None and endpoint is None \
                and not os.environ.get("TRAINWATCH_ENDPOINT"):
            from .local import LocalCollector

            self._local = LocalCollector(local_collector, self.run)
            self.endpoint = self._local.endpoint
            self.health_endpoint = health_endpoint or self._local.health_endpoint
        self._feedback = Feedback(self.run, console=console_findings)
        sub = None if self.health_endpoint is None else \
            HealthSocket(self.health_endpoint, self._feedback, curve)
        self._pid = os.getpid()
        self._seq = itertools.count()
        self._lock = threading.Lock()  # only against concurrent log_* calls, never the sender
        self._closed = False
        self._stopped = False  # should_stop said True
        self._after_close = 0
        self._epoch = 0  # the epoch that steps now belong to (last logged + 1)
        self._step = 0
        self._params: dict[int, list[tuple[str, torch.Tensor]]] = {}
        self._norm_names: dict[int, list[str]] = {}  # per model: the last step's norm columns
        self._pn_names: list[str] | None = None  # of the last grad_norms= given to log_step
        self._grads = GradWatch()
        self._warned: set[str] = set()
        wait = LOCAL_WAIT_S if self._local else None
        try:
            self._sender = Sender(self.endpoint, self.run, self.rank, self.world_size,
                                  random.getrandbits(32), max_queue=max_queue,
                                  max_queue_bytes=max_queue_bytes, curve=curve,
                                  connect_warn_s=wait or CONNECT_WARN_S,
                                  first_peer_s=wait or FIRST_PEER_S, health=sub)
        except BaseException:
            if self._local is not None:
                self._local.stop()
            raise
        lifecycle.track(self)
        body = {"host": socket.gethostname(), "pid": self._pid, "env": identity.wandb_env()}
        self._enqueue(wire.KIND_HELLO, lambda _h: (body, []))

    # -- public API ------------------------------------------------------------------
    @property
    def stats(self) -> dict[str, Any]:
        """Counters and state.

        ``handed_to_socket``: messages ZeroMQ accepted (not proof of delivery: a collector
        that dies with messages in flight loses them, and shows them as sequence gaps that
        no client reported); ``dropped``: messages that never left, all reasons;
        ``dropped_by_reason`` (see ``trainer_client.sender``); ``queued``; ``after_close``:
        calls made after ``close``; ``connected``: a collector is connected now;
        ``sender``: ``running``, ``closed`` or ``dead``. ``sent`` is the old name of
        ``handed_to_socket``, kept for existing readers.
        """
        s = self._sender
        drops = dict(s.drops)
        return {"handed_to_socket": s.handed_to_socket, "dropped": sum(drops.values()),
                "dropped_by_reason": drops, "queued": s.queued(),
                "after_close": self._after_close, "connected": s.connected,
                "sender": s.state(), "sent": s.handed_to_socket,
                "health": dict(self._feedback.stats)}

    @property
    def health(self) -> Health:
        """The run's verdict as last heard from the collector: ``level`` ("unknown" until
        it spoke, then healthy / warning / critical), the raised ``findings`` with their
        messages and remedies, the ``epoch`` judged, the stop if any. A snapshot: it never
        changes under you; read it again for news. Never waits."""
        return self._feedback.health

    @property
    def should_stop(self) -> bool:
        """True once the collector decided a stop at step S and this rank's ``log_step``
        count reached S; every rank turns at the same S (no collective). A rank that never
        hears back never stops. Never waits. Once it said True, the client's goodbye says
        the run ended "stopped"."""
        stop = self._feedback.stop
        if stop is None or self._step < stop.step:
            return False
        self._stopped = True
        return True

    def on_finding(self, callback: Callable[[Finding], object]) -> Callable[[Finding], object]:
        """Call ``callback(finding)`` for each finding raised or cleared, in order, on the
        calling thread at its next ``log_*`` call or ``close()`` (never from the sender
        thread). One that raises is logged once and counted
        (``stats["health"]["callback_errors"]``). Returns ``callback`` (a decorator)."""
        if not callable(callback):
            raise TypeError(f"on_finding takes a callable, got {type(callback).__name__}")
        self._feedback.callbacks.append(callback)
        return callback

    def log_config(self, config: Mapping[str, Any], model: nn.Module | None = None) -> None:
        """Hyperparameters (the seed's section 1); with a model, ``num_params`` is added."""
        cfg = {str(k): plain(v) for k, v in dict(config).items()}
        num_params = None
        if model is not None:
            num_params = sum(p.numel() for p in reductions.unwrap(model).parameters())
        body = {"config": cfg, "num_params": num_params}
        self._enqueue(wire.KIND_CONFIG, lambda _h: (body, []))

    def log_data_stats(self, data: torch.Tensor, channel_names: Sequence[str],
                       mean: Any = None, std: Any = None, channel_dim: int = -1,
                       max_rows: int | None = DATA_MAX_ROWS) -> None:
        """The normalised training data, shipped raw in chunks, once.

        ``channel_dim`` is the dim that holds the channels (-1: the last; 1 for images in
        NCHW); every position along the other dims is a row. At most ``max_rows`` rows
        travel (default ``DATA_MAX_ROWS``; None: all): drawn uniformly, with replacement,
        on the device by a generator seeded with ``DATA_SAMPLE_SEED``. The first chunk's
        body says ``rows_total`` and ``rows_sent``. ``mean``/``std`` are the per-channel
        normalisation constants (physical = x*std+mean); the collector keeps them to
        judge generated samples in physical units.
        """
        if self._closed:
            self._after_close += 1
            return
        names = [str(c) for c in channel_names]
        dim = channel_axis(data, channel_dim, len(names), "log_data_stats", "data")
        dtype = dtype_name(data)
        if max_rows is not None and (type(max_rows) is not int or max_rows < 1):
            raise BadArgument(f"log_data_stats: max_rows must be a positive int or None, "
                               f"got {max_rows!r}")
        consts = {k: constants(v, len(names), k) for k, v in (("mean", mean), ("std", std))}
        try:
            flat, total = sample_rows(data.detach(), dim, max_rows)
            chunks = data_chunks(flat, total, names, dtype, consts, _CHUNK_BYTES)
        except Exception as exc:
            self._failed("log_data_stats", exc)
            return
        for build, host, event, nbytes in chunks:
            self._enqueue(wire.KIND_DATA, build, host, event, nbytes)

    def log_step(self, loss: torch.Tensor | float,
                 components: Mapping[str, torch.Tensor | float] | None = None,
                 model: nn.Module | None = None,
                 grad_norm: torch.Tensor | float | None = None,
                 lr: torch.Tensor | float | None = None,
                 grad_norms: tuple[list[str], torch.Tensor] | None = None) -> None:
        """One optimisation step: loss, loss terms, gradient norms. Call it after
        ``backward()`` (and clipping) and before ``zero_grad()``: it reads ``.grad``.

        The global gradient L2 norm is ``grad_norm`` when given (e.g. what
        ``clip_grad_norm_`` returned), else computed on the device from ``model``'s
        gradients. With a model, the per-parameter gradient norms travel too. ``lr`` is
        the optimizer's current rate (e.g. ``scheduler.get_last_lr()[0]``), so remedies
        quote the rate the run really had. ``grad_norms``: per-parameter norms taken
        earlier (``reductions.grad_norms(params)``, e.g. before ``zero_grad``), used
        instead of ``model``'s gradients.
        """
        if self._closed:
            self._after_close += 1
            return
        if grad_norms is not None:
            self._pn_names = grad_norms[0]
        if model is None and grad_norms is None and not getattr(loss, "is_cuda", False):
            # Nothing on a device: the values already live in host memory. Queue the
            # references and let the sender thread sort and read them; right after a
            # backward pass every Python line here costs ~10x (cold caches).
            comps = dict(components) if components else {}
            self._step += 1
            self._enqueue(wire.KIND_STEP, host_step,
                          (loss, comps, grad_norm, lr, versions(loss, comps, grad_norm, lr)),
                          step=self._step)
            return
        try:
            layout, host, event = self._step_vector(loss, components, model, grad_norm, lr,
                                                    grad_norms)
        except (BadArgument, BadDtype):
            raise
        except Exception as exc:
            self._failed("log_step", exc)
            return
        self._step += 1
        self._enqueue(wire.KIND_STEP, layout.body, host, event, step=self._step)

    def _step_vector(self, loss: Any, components: Any, model: nn.Module | None,
                     grad_norm: Any, lr: Any, grad_norms: Any = None) -> tuple:
        """log_step's device work: the vector to copy to the host and its layout."""
        pn = grad_norms
        if pn is None and model is not None:
            params = self._params_of(model)
            pn = reductions.grad_norms(params)
            if pn is None:
                self._grads.none(params, self._step + 1)
            else:
                self._norm_names[id(model)] = pn[0]
        return step_vector(loss, components, pn, grad_norm, lr, self._grads, self._step + 1)

    def log_epoch(self, epoch: int, model: nn.Module | None = None,
                  ema_model: nn.Module | None = None) -> None:
        """Close ``epoch``: weight statistics and the EMA difference, reduced on the device.

        The epoch message always leaves (the collector closes epochs on it); summaries
        that cannot be computed are left out of it, with one warning.
        """
        if self._closed:
            self._after_close += 1
            return
        epoch = int(epoch)
        if epoch < 0:
            raise BadArgument(f"log_epoch: epoch must be >= 0, got {epoch}")
        names: list[str] | None = None
        host = event = None
        nw = ne = 0
        if model is not None:
            try:
                params = self._params_of(model)
                # the columns of the norms its steps shipped (after zero_grad no gradient is
                # left to name them): from model= or from grad_norms=
                names = self._norm_names.get(id(model)) or self._pn_names
                host, event, nw, ne = epoch_vector(params, ema_model)
            except Exception as exc:
                self._warn_once("log_epoch", "trainwatch: log_epoch could not summarise the "
                                "weights (%s: %s); the epoch is sent without them",
                                type(exc).__name__, exc)
                host = event = None
                nw = ne = 0

        def build(h: torch.Tensor | None) -> tuple:
            v = h.tolist() if h is not None else []
            body = {"weights": v[:nw] or None, "ema": v[nw:nw + ne] or None,
                    "param_names": names}
            return body, []

        self._enqueue(wire.KIND_EPOCH, build, host, event, epoch=epoch)
        self._epoch = epoch + 1

    def log_validation(self, epoch: int, samples: torch.Tensor,
                       channel_names: Sequence[str] | None = None,
                       channel_dim: int = -1) -> None:
        """Generated samples (normalised), shipped raw in their dtype.

        ``channel_dim`` holds the channels (-1: the last; 1 for images in NCHW): it is moved
        last on the device. Call it before ``log_epoch(epoch)`` so the samples land in that
        epoch's record.
        """
        if self._closed:
            self._after_close += 1
            return
        dtype = dtype_name(samples)
        names = [str(c) for c in channel_names] if channel_names is not None else None
        dim = channel_axis(samples, channel_dim, None if names is None else len(names),
                           "log_validation", "samples")
        try:
            x = samples.detach()
            if dim != x.ndim - 1:
                x = x.movedim(dim, -1)
            host, event = reductions.to_host(x.contiguous())
        except Exception as exc:
            self._failed("log_validation", exc)
            return
        body = {"channels": names, "epoch": int(epoch)}
        self._enqueue(wire.KIND_VALIDATION, lambda h: (body, [raw(h, "samples", dtype)]),
                      host, event, host.numel() * host.element_size(), epoch=int(epoch))

    def close(self, timeout: float = 5.0, ended: str = "finished") -> None:
        """Send what can be sent within ``timeout`` seconds, then say goodbye. Always returns.

        ``ended``: how the run ended, as the summary will say it ("finished", or e.g.
        "interrupted"; ``with TrainerClient() as tw:`` says so for an exception). With no
        collector ever connected it returns at once (what was queued is counted as
        ``no_peer``); a local collector is waited for, it may still be starting.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if os.getpid() != self._pid:
            return
        if self._feedback.callbacks:  # findings heard since the last log_* call
            self._feedback.deliver()
        if self._local is not None:  # our own collector may still be starting up
            timeout = max(timeout, 30.0)
        deadline = time.monotonic() + max(0.0, timeout)
        seq = next(self._seq)
        how = "stopped" if self._stopped and ended == "finished" else str(ended)[:64]
        final = Item(wire.KIND_BYE, seq, self._step, self._epoch, self._sender.enq_dropped,
                     lambda _h: ({"stats": self._final_stats(), "ended": how}, []))
        if not self._sender.close(deadline, final):
            _log.warning("trainwatch: close() timed out after %.1fs", timeout)
        if self._local is not None:
            self._local.wait(max(5.0, 6 * timeout))

    def __enter__(self) -> TrainerClient:
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        self.close(ended=lifecycle.how_it_ended(exc))

    # -- internals -------------------------------------------------------------------
    def _enqueue(self, kind: int, build: Any, host: Any = None, event: Any = None,
                 nbytes: int = 0, step: int | None = None, epoch: int | None = None) -> None:
        fb = self._feedback
        if fb.pending and fb.callbacks:  # findings the sender thread heard: on this thread
            fb.deliver()
        if self._closed:
            self._after_close += 1
            return
        with self._lock:  # uncontended in a single training thread: ~100 ns
            seq = next(self._seq)
            item = Item(kind, seq, self._step if step is None else step,
                        self._epoch if epoch is None else epoch,
                        self._sender.enq_dropped, build, host, event, nbytes)
            self._sender.offer(item)

    def _params_of(self, model: nn.Module) -> list[tuple[str, torch.Tensor]]:
        key = id(model)
        params = self._params.get(key)
        if params is None:
            params = self._params[key] = reductions.named_params(reductions.unwrap(model))
        return params

    def _final_stats(self) -> dict[str, int]:
        s = self._sender
        return {"handed_to_socket": s.handed_to_socket + 1, **s.drops}

    def _failed(self, call: str, exc: BaseException) -> None:
        """A log_* call whose device work raised: dropped and counted, logged once a call."""
        with self._lock:
            next(self._seq)  # its number is spent: the collector sees a reported gap
            self._sender.count_failed()
        self._warn_once(call, "trainwatch: %s failed and was dropped (%s: %s); training goes "
                        "on (stats: log_failed)", call, type(exc).__name__, exc)

    def _warn_once(self, key: str, msg: str, *args: Any) -> None:
        if key not in self._warned:
            self._warned.add(key)
            _log.warning(msg, *args)

    def _forked(self) -> None:
        self._closed = True
        self._pid = -1
