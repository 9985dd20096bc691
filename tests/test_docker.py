"""docker/: what can be checked without a Docker engine.

The collector image installs exactly pyproject's collector dependencies and no torch, runs
as a non-root user, starts the console script pyproject declares with arguments the real
``trainwatch`` parser accepts; compose.yaml points at files and stages that exist.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import sys
from pathlib import Path

import pytest
import yaml

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

_PIP_OPTS_WITH_VALUE = {"-i", "--index-url", "--extra-index-url", "-c", "--constraint",
                        "-r", "--requirement", "-t", "--target", "--prefix", "--root"}


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    out = []
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _stages() -> dict[str, list[tuple[str, str]]]:
    """Each named stage's instructions, its parent stages' first (FROM <stage> inherits)."""
    stages: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for word, rest in _instructions((DOCKER / "Dockerfile").read_text()):
        if word == "FROM":
            parts = rest.split()
            parent = stages.get(parts[0], [])
            current = list(parent)
            stages[parts[-1] if len(parts) == 3 and parts[1].upper() == "AS" else parts[0]] = \
                current
        elif current is not None:
            current.append((word, rest))
    return stages


def _pip_installs(stage: list[tuple[str, str]]) -> list[list[str]]:
    """The package arguments of every ``pip install`` run in a stage (options dropped)."""
    installs = []
    for word, rest in stage:
        if word != "RUN":
            continue
        for command in re.split(r"&&|;", rest):
            tokens = shlex.split(command)
            if tokens[:2] != ["pip", "install"] and tokens[:4] != ["python", "-m", "pip",
                                                                   "install"]:
                continue
            args, skip = [], False
            for tok in tokens[tokens.index("install") + 1:]:
                if skip:
                    skip = False
                elif tok in _PIP_OPTS_WITH_VALUE:
                    skip = True
                elif not tok.startswith("-"):
                    args.append(tok)
            installs.append(args)
    return installs


def _norm(req: str) -> str:
    return req.replace(" ", "").lower()


def _last(stage: list[tuple[str, str]], word: str) -> str:
    values = [rest for w, rest in stage if w == word]
    assert values, f"no {word} in the stage"
    return values[-1]


@pytest.fixture(scope="module")
def collector() -> list[tuple[str, str]]:
    return _stages()["collector"]


def test_collector_installs_exactly_the_collector_dependencies(collector):
    installs = _pip_installs(collector)
    packages = {_norm(a) for args in installs for a in args if a != "."}
    assert packages == {_norm(d) for d in _pyproject()["project"]["dependencies"]}
    # The project itself goes in without dependency resolution, so nothing else arrives.
    project = [args for args in installs if "." in args]
    assert project and all(args == ["."] for args in project)
    assert any("--no-deps" in rest for w, rest in collector if w == "RUN" and " . " in rest + " ")


def test_collector_image_has_no_torch(collector):
    for word, rest in collector:
        if word in ("RUN", "ENV", "ARG"):
            assert not re.search(r"torch|pytorch", rest, re.I), f"{word} {rest}"
    for args in _pip_installs(collector):
        assert not any(re.match(r"torch", a, re.I) for a in args)


def test_collector_runs_as_a_non_root_user(collector):
    user = _last(collector, "USER").split(":")[0]
    assert user not in ("root", "0")
    created = [rest for w, rest in collector if w == "RUN" and "useradd" in rest]
    assert created and user in shlex.split(created[0])
    uid = re.search(r"--uid (\d+)", created[0])
    assert uid and int(uid.group(1)) != 0
    # USER comes before the entrypoint: nothing after it runs as root.
    words = [w for w, _ in collector]
    assert max(i for i, w in enumerate(words) if w == "USER") < words.index("ENTRYPOINT")


def test_entrypoint_is_the_declared_console_script(collector):
    entry = json.loads(_last(collector, "ENTRYPOINT"))
    scripts = _pyproject()["project"]["scripts"]
    assert entry == ["trainwatch"] and "trainwatch" in scripts
    module, func = scripts["trainwatch"].split(":")
    mod = __import__(module, fromlist=[func])
    assert callable(getattr(mod, func))


def test_cmd_is_a_collect_the_real_parser_accepts(collector):
    from collector.cli import parser

    cmd = json.loads(_last(collector, "CMD"))
    args = parser().parse_args(cmd)
    assert args.cmd == "collect"
    assert "tcp://0.0.0.0:5555" in args.bind
    assert args.curve_keys == "/keys" and not args.insecure
    volumes = json.loads(_last(collector, "VOLUME"))
    assert str(Path(args.record).parent) in volumes
    assert args.wandb_dir in volumes
    assert "5555" in _last(collector, "EXPOSE").split()
    env = " ".join(rest for w, rest in collector if w == "ENV")
    cache = re.search(r"NUMBA_CACHE_DIR=(\S+)", env)
    assert cache and cache.group(1).startswith("/tmp/")


def test_copied_sources_exist_and_pass_the_dockerignore():
    ignore = (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
    patterns = [p.strip() for p in ignore if p.strip() and not p.startswith("#")]
    for stage in _stages().values():
        for word, rest in stage:
            if word != "COPY" or rest.startswith("--from"):
                continue
            for src in rest.split()[:-1]:
                path = src.rstrip("/")
                assert (ROOT / path).exists(), f"COPY {src}: no such file in the repository"
                # Last matching pattern wins, as in Docker; the file must end up included.
                included = True
                for p in patterns:
                    neg = p.startswith("!")
                    pat = p[1:] if neg else p
                    if fnmatch.fnmatch(path, pat.rstrip("/")):
                        included = neg
                assert included, f"COPY {src} is excluded by Dockerfile.dockerignore"


def test_trainer_stage_pins_a_torch_the_client_supports():
    """The image pins one exact (CPU) torch, within the range the client extra declares."""
    from packaging.requirements import Requirement

    trainer = _stages()["trainer"]
    pins = [a for args in _pip_installs(trainer) for a in args if a.startswith("torch")]
    client = [Requirement(r) for r in _pyproject()["project"]["optional-dependencies"]["client"]]
    (supported,) = [r for r in client if r.name == "torch"]
    (pin,) = [Requirement(_norm(p)) for p in pins]
    (exact,) = [s.version for s in pin.specifier if s.operator == "=="]
    assert supported.specifier.contains(exact), (pin, supported)


# -- compose -------------------------------------------------------------------------------
def _compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def _volume(spec: str) -> tuple[str, str, str]:
    """(source, target, mode) with ``${VAR:-default}`` resolved to its default."""
    spec = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", spec)
    parts = spec.split(":")
    return parts[0], parts[1], parts[2] if len(parts) > 2 else "rw"


def test_compose_builds_existing_stages_from_existing_files():
    services = _compose()["services"]
    stages = _stages()
    assert {"collector", "trainer"} <= set(services)
    for name in ("collector", "trainer"):
        build = services[name]["build"]
        context = (DOCKER / build["context"]).resolve()
        assert context == ROOT
        assert (context / build["dockerfile"]).is_file()
        assert build["target"] in stages


def test_compose_trainer_runs_the_example_against_the_collector():
    compose = _compose()
    services = compose["services"]
    trainer = services["trainer"]
    command = trainer["command"]
    assert command[:3] == ["torchrun", "--nproc_per_node", "2"]
    assert (ROOT / command[3]).is_file()
    assert command == json.loads(_last(_stages()["trainer"], "CMD"))
    endpoint = trainer["environment"]["TRAINWATCH_ENDPOINT"]
    host, port = re.fullmatch(r"tcp://([\w.-]+):(\d+)", endpoint).groups()
    assert host == "collector" and host in services
    assert f"tcp://0.0.0.0:{port}" in json.loads(_last(_stages()["collector"], "CMD"))
    assert trainer["environment"]["TRAINWATCH_CURVE_KEYS"] == "/keys"
    assert "collector" in trainer["depends_on"]


def test_compose_mounts_keys_read_only_and_declares_its_volumes():
    compose = _compose()
    declared = set(compose.get("volumes") or {})
    for name, service in compose["services"].items():
        for spec in service.get("volumes", []):
            source, target, mode = _volume(spec)
            if not source.startswith((".", "/")):
                assert source in declared, f"{name}: volume {source} is not declared"
            if target == "/keys" and name in ("collector", "trainer"):
                assert mode == "ro"
    for name in ("collector", "trainer"):
        targets = {_volume(v)[1] for v in compose["services"][name]["volumes"]}
        assert "/keys" in targets
    keys = compose["services"]["keys"]
    assert keys["image"] == compose["services"]["collector"]["image"]
    from collector.cli import parser

    assert parser().parse_args(keys["command"]).cmd == "keys"
