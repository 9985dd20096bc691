"""The ``trainwatch`` command (``python -m collector`` too).

    trainwatch collect --bind tcp://127.0.0.1:5555 --record run.twrec --jsonl run.jsonl
    trainwatch collect --bind ... --stop-on diagnosis/gradient_explosion  # stop such runs
    trainwatch replay run.twrec --jsonl replayed.jsonl
    trainwatch inspect run.twrec [--json]
    trainwatch report run.twrec -o report.html
    trainwatch upload run.twrec [--wandb-mode online]
    trainwatch keys generate KEYDIR
    trainwatch forward --bind ipc:///tmp/tw.sock --connect tcp://login:5555
    trainwatch dashboard --project P [--entity E]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from collector.sinks.base import FanOut, Sink

if TYPE_CHECKING:
    from collector.analysis.profile import Profile

__all__ = ["main"]


def _outputs(args: argparse.Namespace, profile: Profile, default_wandb: str | None,
             replaying: bool = False, resume: bool = False) -> list[Sink]:
    """The JSONL and wandb sinks the arguments ask for; ``resume``: they continue an earlier
    session's outputs (each record once) as its recording is rebuilt."""
    sinks: list[Sink] = []
    if getattr(args, "jsonl", None):
        from collector.sinks.jsonl import JsonlSink

        sinks.append(JsonlSink(args.jsonl, resume=resume))
    mode = args.wandb_mode or default_wandb
    if mode != "disabled":
        from collector.sinks.wandb_sink import WandbSink

        # A wandb-core service inherited from whoever started this process (a training
        # script that called wandb.init sets WANDB_SERVICE for its children) is not ours:
        # our runs would live and die with it, and a run left open there by a collector
        # that was killed would refuse its own resume ("run ID ... is in use").
        os.environ.pop("WANDB_SERVICE", None)

        sinks.append(WandbSink(project=args.wandb_project, entity=args.wandb_entity,
                               group=args.wandb_group, mode=mode, dir=args.wandb_dir,
                               resume=resume,
                               # a replay outruns wandb's start-up: wait, never drop
                               block_when_full=replaying or resume))
    return sinks


def _sinks(args: argparse.Namespace, profile: Profile, default_wandb: str | None,
           replaying: bool = False) -> list[Sink]:
    from collector.sinks.console import EventLogSink

    return [EventLogSink(), *_outputs(args, profile, default_wandb, replaying)]


def _profile(args: argparse.Namespace) -> Profile:
    from collector.analysis.profile import ProfileError
    from collector.analysis.profile_load import load_profile, with_stop_on

    try:
        profile = load_profile(args.rules)
        stop_on = getattr(args, "stop_on", None)
        if stop_on is not None:
            profile = with_stop_on(profile, [n.strip() for n in stop_on.split(",") if n.strip()])
        return profile
    except ProfileError as exc:
        raise SystemExit(f"trainwatch: bad rules profile: {exc}") from None


def _health_binds(binds: list[str], given: list[str] | None, flag: str) -> list[str]:
    """The back-channel's endpoints: ``given`` (``none``: no back-channel), else one beside
    each of ``binds`` (tcp port + 1, ipc path + ``.health``)."""
    from collector.ingest.binds import BindError
    from trainer_client.wire.health import health_endpoint

    if given:
        return [] if given == ["none"] else list(given)
    out = []
    for b in binds:
        h = health_endpoint(b)
        if h is None:
            raise BindError(f"no back-channel endpoint follows from {b} (a tcp port + 1, an "
                            f"ipc path + .health): pass {flag} ENDPOINT, or {flag} none")
        out.append(h)
    return out


def cmd_collect(args: argparse.Namespace) -> int:
    """The one place the live parts are wired together: sinks, recorder, view, server."""
    from collector.ingest.binds import check_binds
    from collector.ingest.limits import Limits
    from collector.ingest.pipeline import Pipeline
    from collector.ingest.server import Collector
    from collector.ingest.stops import NO_STOPS, StopPolicy
    from collector.recording.writer import NullRecorder, RecordWriter
    from collector.report.liveview import NullView, make_view
    from collector.sinks.console import EventLogSink
    from collector.sinks.health_pub import NULL_PUBLISHER, HealthPublisher

    health_binds = _health_binds(args.bind, args.health_bind, "--health-bind")
    # Refused before the recording is touched; the server checks again and warns.
    check_binds(args.bind + health_binds, bool(args.curve_keys), args.insecure, warn=False)
    profile = _profile(args)
    health = HealthPublisher() if health_binds else NULL_PUBLISHER
    actions = StopPolicy(profile) if profile.stop_on else NO_STOPS
    if profile.stop_on and not health_binds:
        logging.getLogger("trainwatch.collector").warning(
            "stops on %s are decided and recorded, but with no back-channel no rank hears "
            "of them", ", ".join(profile.stop_on))
    feedback: list[Sink] = [health, actions]
    earlier = Path(args.record) if args.record else None
    resume = earlier is not None and earlier.exists() and earlier.stat().st_size > 0
    outputs = _outputs(args, profile, None, resume=resume)
    limits = Limits(max_world_size=args.max_world_size, max_held_bytes=args.max_held_mb << 20,
                    max_runs=args.max_runs, evict_after_s=args.evict_after)
    pipe = Pipeline(profile, FanOut([EventLogSink(), *outputs, *feedback]),
                    recorder=RecordWriter(args.record) if args.record else NullRecorder(),
                    epoch_timeout_s=args.epoch_timeout, limits=limits)
    if resume:
        from collector.recording.reader import ReadStats

        # The outputs continue where the earlier session left them: each record once.
        st = ReadStats()
        pipe.rebuild(earlier, FanOut(outputs + feedback), st)
        logging.getLogger("trainwatch.collector").log(
            logging.WARNING if st.skipped or st.corrupted else logging.INFO,
            "continuing %s: state and outputs rebuilt from %s", earlier, st.summary())
    pipe.control(limits.control())  # recorded: a replay accepts and drops what this does
    # the board draws with the console log records go through (set up in main)
    board = getattr(args, "board_console", None)
    view = NullView() if args.no_view else make_view(sys.stdout, board)
    collector = Collector(args.bind, pipe, curve_keys=args.curve_keys, once=args.once,
                          quiet_s=args.quiet, view=view, max_msg_bytes=args.max_msg_mb << 20,
                          insecure=args.insecure, health=health, health_binds=health_binds,
                          health_required=bool(args.health_bind), actions=actions)
    return collector.serve()


def cmd_replay(args: argparse.Namespace, default_wandb: str = "disabled") -> int:
    from collector.ingest.pipeline import replay
    from collector.sinks.jsonl import MemorySink

    profile = _profile(args)
    mem = MemorySink() if getattr(args, "findings", False) else None
    sinks = FanOut(_sinks(args, profile, default_wandb, replaying=True) + ([mem] if mem else []))
    pipe, st = replay(args.recording, profile, sinks)
    if mem is not None:
        from collector.analysis.findings import format_findings

        print(format_findings(mem.records))
    print(f"replayed {st.summary()} ({pipe.accepted} messages, "
          f"{sum(pipe.rejected.values())} rejected) -> {pipe.records_out} output records",
          file=sys.stderr)
    return 0


def cmd_upload(args: argparse.Namespace) -> int:
    return cmd_replay(args, default_wandb=None)


def cmd_inspect(args: argparse.Namespace) -> int:
    from collector.recording.inspect import format_table, inspect_recording

    info = inspect_recording(args.recording)
    print(json.dumps(info, indent=2, sort_keys=True) if args.json else format_table(info))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from collector.ingest.pipeline import replay
    from collector.report.html import write_report
    from collector.sinks.jsonl import MemorySink

    profile = _profile(args)
    mem = MemorySink()
    pipe, st = replay(args.recording, profile, mem)
    write_report(mem.json(), args.output, profile, ranks=pipe.state.rank_table())
    print(f"wrote {args.output} from {st.summary()}", file=sys.stderr)
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    from collector.ingest.auth import generate

    d = generate(args.dir)
    print(f"wrote CURVE keys to {d} (server.key*, client.key*, authorized/)")
    return 0


def cmd_forward(args: argparse.Namespace) -> int:
    from collector.ingest.binds import check_binds
    from collector.ingest.forward import forward

    health_bind = _health_binds([args.bind], args.health_bind and [args.health_bind],
                                "--health-bind")
    health_connect = _health_binds([args.connect], args.health_connect and [args.health_connect],
                                   "--health-connect")
    check_binds([args.bind, *health_bind], False, args.insecure)
    forward(args.bind, args.connect, args.curve_keys,
            health=(health_bind[0], health_connect[0]) if health_bind and health_connect
            else None)
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    from collector.report.dashboard import create_workspace

    print(create_workspace(args.project, args.entity, _profile(args)))
    return 0


def _wandb_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--wandb-mode", choices=["offline", "online", "disabled"], default=None,
                   help="default: offline unless an API key is configured")
    p.add_argument("--wandb-dir", default=None, help="where offline runs are written")
    p.add_argument("--wandb-project", default=None)
    p.add_argument("--wandb-entity", default=None)
    p.add_argument("--wandb-group", default=None)
    p.add_argument("--rules", default=None,
                   help="a packaged profile by name (generic) or a TOML file over one")


def _limit_defaults():  # noqa: ANN202 - a Limits; imported here to keep start-up light
    from collector.ingest.limits import Limits

    return Limits()


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="trainwatch", description=__doc__.split("\n")[0])
    ap.add_argument("-v", "--verbose", action="store_true")
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("collect", help="run the collector")
    p.add_argument("--bind", action="append", required=True, help="endpoint; repeatable")
    p.add_argument("--record", help="append accepted messages to this recording")
    p.add_argument("--jsonl", help="write records as JSON lines")
    p.add_argument("--once", action="store_true",
                   help="exit once every run that connected has finished")
    p.add_argument("--quiet", type=float, default=3.0,
                   help="with --once: seconds of silence before exiting")
    p.add_argument("--epoch-timeout", type=float, default=60.0,
                   help="seconds to wait for a rank before closing an epoch without it")
    p.add_argument("--curve-keys", default=None, help="serve with CURVE keys from this folder")
    p.add_argument("--insecure", action="store_true",
                   help="allow a non-loopback bind without CURVE")
    p.add_argument("--health-bind", action="append", default=None,
                   help="the back-channel's endpoint (repeatable; default: beside each --bind, "
                        "tcp port + 1 or ipc path + .health; 'none': no back-channel)")
    p.add_argument("--stop-on", default=None, metavar="FINDINGS",
                   help="comma-separated findings that stop a run, e.g. "
                        "diagnosis/gradient_explosion,diagnosis/mode_collapse (over the "
                        "profile's [actions] stop_on)")
    d = _limit_defaults()
    p.add_argument("--max-msg-mb", type=int, default=64,
                   help="the largest message taken (default %(default)s)")
    p.add_argument("--max-held-mb", type=int, default=d.max_held_bytes >> 20,
                   help="memory for open epochs, samples and runs; what would exceed it is "
                        "refused, counted and said (default %(default)s)")
    p.add_argument("--max-world-size", type=int, default=d.max_world_size,
                   help="the most ranks a run may claim (default %(default)s)")
    p.add_argument("--max-runs", type=int, default=d.max_runs,
                   help="runs held at once (default %(default)s)")
    p.add_argument("--evict-after", type=float, default=d.evict_after_s,
                   help="seconds a finished run's state is kept (default %(default)s)")
    p.add_argument("--no-view", action="store_true", help="no live status board")
    _wandb_args(p)
    p.set_defaults(func=cmd_collect)

    for name, func, hlp in (("replay", cmd_replay, "feed a recording through the pipeline"),
                            ("upload", cmd_upload, "replay a recording into wandb")):
        p = sub.add_parser(name, help=hlp)
        p.add_argument("recording", nargs="+")
        p.add_argument("--jsonl")
        if name == "replay":
            p.add_argument("--findings", action="store_true",
                           help="print, per run and rule, when it was raised and cleared")
        _wandb_args(p)
        p.set_defaults(func=func)

    p = sub.add_parser("inspect", help="per run and rank: messages, gaps, drops")
    p.add_argument("recording")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("report", help="an HTML health report from a recording")
    p.add_argument("recording", nargs="+")
    p.add_argument("-o", "--output", default="report.html")
    p.add_argument("--rules", default=None)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("keys", help="CURVE key management")
    ks = p.add_subparsers(dest="keys_cmd", required=True)
    g = ks.add_parser("generate", help="write server/client key pairs and authorized/")
    g.add_argument("dir")
    g.set_defaults(func=cmd_keys)

    p = sub.add_parser("forward", help="relay a node's ranks to the collector")
    p.add_argument("--bind", required=True, help="where this node's ranks connect")
    p.add_argument("--connect", required=True, help="the collector's endpoint")
    p.add_argument("--curve-keys", default=None, help="client keys for the collector")
    p.add_argument("--insecure", action="store_true")
    p.add_argument("--health-bind", default=None,
                   help="where the ranks subscribe to the back-channel (default: beside "
                        "--bind; 'none': no relay)")
    p.add_argument("--health-connect", default=None,
                   help="the collector's back-channel (default: beside --connect)")
    p.set_defaults(func=cmd_forward)

    p = sub.add_parser("dashboard", help="create the seed's wandb workspace (online)")
    p.add_argument("--project", required=True)
    p.add_argument("--entity", default=None)
    p.add_argument("--rules", default=None, help="a TOML profile (its thresholds, loss terms)")
    p.set_defaults(func=cmd_dashboard)
    return ap


def _log_handler(args: argparse.Namespace) -> logging.Handler:
    """Where log records go: through the live board's console when ``collect`` draws one on
    the terminal that stderr also shows (plain lines would land inside the board), else
    plain lines on stderr. The console is kept on ``args`` for the board to draw with.
    Every line stays one line: whatever a message quotes from a sender is escaped."""
    from collector.report.liveview import board_console, board_log_handler
    from collector.text import SafeFormatter

    args.board_console = None
    if args.cmd == "collect" and not args.no_view and sys.stderr.isatty():
        args.board_console = board_console(sys.stdout)
    if args.board_console is not None:
        handler = board_log_handler(args.board_console)
        handler.setFormatter(SafeFormatter("%(name)s %(message)s"))
        return handler
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(SafeFormatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    return handler


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        handlers=[_log_handler(args)])
    try:
        return int(args.func(args) or 0)
    except (OSError, ValueError, RuntimeError) as exc:  # bad paths, files, settings
        print(f"trainwatch {args.cmd}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
