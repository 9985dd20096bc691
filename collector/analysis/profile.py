"""The health rules as data: a TOML profile loaded into a frozen, validated ``Profile``.

The packaged default (``profiles/gait_diffusion.toml``) is the seed guide. A user's TOML
overrides any key of it, table by table, and may add rules or switch them off:

    profile = load_profile("my_rules.toml")   # or load_profile(None) for the default
    profile.phase(120)                        # -> 2

Errors are ``ProfileError``s naming the file and the key, e.g.
``my_rules.toml: rules.stalled.length: expected a positive integer, got 0``.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["DEFAULT_PATH", "Condition", "Diagnosis", "Profile", "ProfileError", "Rule",
           "load_profile"]

DEFAULT_PATH = Path(__file__).parent / "profiles" / "gait_diffusion.toml"

OPS = (">", ">=", "<", "<=", "==", "!=")
SEVERITIES = ("info", "warning", "critical")
DETAILS = ("", "largest_params", "smallest_params", "nonfinite", "desync")
# Fields each condition kind needs besides `kind` and `metric`.
KINDS: dict[str, tuple[str, ...]] = {
    "threshold": ("op", "threshold"),
    "ratio": ("denominator", "op", "threshold"),
    "surge": ("factor", "window", "min_count"),
    "change": ("threshold",),
    "streak": ("op", "threshold", "length"),
    "count": ("op", "threshold", "window", "min_count"),
    "slope": ("op", "threshold", "window", "min_count"),
}
_MULTI_METRIC = ("threshold", "change")  # kinds that take a list or a "prefix/*" pattern
_RULE_KEYS = {"enabled", "severity", "message", "remedy", "phases", "detail", "suggest"}
_DIAG_KEYS = {"enabled", "severity", "cause", "remedy", "phases", "suggest", "require",
              "score", "conditions"}
_TOP_KEYS = {"name", "channels", "validation", "phases", "ddp", "gradients", "loss", "rules",
             "diagnoses"}
# What a message template may name; every kind fills the ones it knows.
MESSAGE_FIELDS = dict(value=1.0, threshold=1.0, metric="m", median=1.0, factor=1.0,
                      previous=1.0, change=0.5, streak=1, count=1, slope=1.0,
                      denominator="d", window=1, length=1, min_count=1)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# Value checks by name: (predicate, what an error says was expected).
_CHECKS: dict[str, tuple[Any, str]] = {
    "str": (lambda v: isinstance(v, str), "a string"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "number": (lambda v: (_is_int(v) or isinstance(v, float)) and math.isfinite(v), "a number"),
    "posint": (lambda v: _is_int(v) and v > 0, "a positive integer"),
    "op": (lambda v: isinstance(v, str) and v in OPS, f"one of {OPS}"),
    "severity": (lambda v: isinstance(v, str) and v in SEVERITIES, f"one of {SEVERITIES}"),
    "detail": (lambda v: isinstance(v, str) and v in DETAILS, f"one of {DETAILS}"),
    "phases": (lambda v: isinstance(v, list) and all(_is_int(p) and p > 0 for p in v),
               "a list of phase numbers (1, 2, ...)"),
    "ends": (lambda v: isinstance(v, list) and all(_is_int(p) for p in v)
             and v == sorted(set(v)), "an increasing list of epochs"),
    "names": (lambda v: isinstance(v, list) and all(isinstance(n, str) and n for n in v),
              "a list of names"),
    "metric": (lambda v: (isinstance(v, str) and v != "") or (
        isinstance(v, list) and v != [] and all(isinstance(m, str) and m for m in v)),
        "a metric name or a list of them"),
}


class ProfileError(ValueError):
    """A profile file that cannot be used; the message names the file and the key."""


@dataclass(frozen=True)
class Condition:
    """One test on the epoch's metrics (and the run's history of them)."""

    kind: str
    metrics: tuple[str, ...]  # a name ending in "/*" matches every metric with that prefix
    op: str = ">"
    threshold: float = 0.0
    denominator: str = ""
    factor: float = 0.0
    window: int = 0
    min_count: int = 0
    length: int = 0
    latest: bool = False  # judge an absent metric by its latest value


@dataclass(frozen=True)
class Rule:
    """``health/<id>``: a condition with what to say when it starts firing."""

    id: str
    condition: Condition
    severity: str
    message: str
    remedy: str
    phases: tuple[int, ...] = ()  # empty: every phase
    detail: str = ""
    suggest: tuple[tuple[str, float | str], ...] = ()


@dataclass(frozen=True)
class Diagnosis:
    """``diagnosis/<id>``: fires when at least ``require`` of its conditions hold."""

    id: str
    conditions: tuple[tuple[str, Condition], ...]
    require: int
    score: bool  # also write health/<id>_score (conditions holding) and health/<id>
    severity: str
    cause: str
    remedy: str
    phases: tuple[int, ...] = ()
    suggest: tuple[tuple[str, float | str], ...] = ()


@dataclass(frozen=True)
class Profile:
    name: str
    source: str  # the user's file, or the default's path
    knee_channel: str  # "" switches the knee metrics and rules off
    grf_channel: str
    knee_healthy_std: float
    grf_healthy_std: float
    phase_ends: tuple[int, ...]  # phase i (1-based) covers epochs up to phase_ends[i-1]
    desync_rel_tol: float
    report_params: int
    loss_terms: tuple[str, ...]  # the loss terms in the order views show them
    rules: tuple[Rule, ...]
    diagnoses: tuple[Diagnosis, ...]

    def phase(self, epoch: int) -> int:
        for i, end in enumerate(self.phase_ends):
            if epoch <= end:
                return i + 1
        return len(self.phase_ends) + 1

    def diagnosis(self, did: str) -> Diagnosis | None:
        return next((d for d in self.diagnoses if d.id == did), None)

    @property
    def thresholds(self) -> dict[str, float]:
        """The validation thresholds views draw as lines (wandb gets them as constant
        series beside the metrics: its panels have no threshold option)."""
        out = {}
        if self.knee_channel:
            out["threshold/knee_r_std"] = self.knee_healthy_std
        if self.grf_channel:
            out["threshold/grf_vz_r_std"] = self.grf_healthy_std
        return out

    @property
    def history_len(self) -> int:
        """How many past values of a metric the rules can look at."""
        conds = [r.condition for r in self.rules]
        conds += [c for d in self.diagnoses for _, c in d.conditions]
        return 1 + max([max(c.window, c.length) for c in conds] + [1])


def load_profile(path: str | Path | None = None) -> Profile:
    """The default profile, with the TOML at ``path`` (if any) merged over it."""
    data = _read(DEFAULT_PATH)
    user: dict[str, Any] = {}
    if path is not None:
        user = _read(Path(path))
        data = _merge(data, user)
    return _Builder(data, user, str(DEFAULT_PATH), None if path is None else str(path)).build()


def _read(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise ProfileError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"{path}: not valid TOML: {exc}") from None


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


class _Builder:
    """Validates the merged tables; each error names the file the bad key came from."""

    def __init__(self, data: dict, user: dict, default: str, user_path: str | None) -> None:
        self.data, self.user, self.default, self.user_path = data, user, default, user_path

    def fail(self, keys: tuple[str, ...], problem: str) -> ProfileError:
        node, origin = self.user, self.default
        for k in keys:  # the user's file if it set this key or a table above it
            if not isinstance(node, dict) or k not in node:
                break
            node = node[k]
            origin = self.user_path or self.default
        return ProfileError(f"{origin}: {'.'.join(keys)}: {problem}")

    def table(self, keys: tuple[str, ...], value: Any, allowed: set[str] | None) -> dict:
        if not isinstance(value, dict):
            raise self.fail(keys, f"expected a table, got {value!r}")
        for k in value:
            if allowed is not None and k not in allowed:
                raise self.fail(keys + (k,), f"unknown key (expected one of {sorted(allowed)})")
        return value

    def get(self, keys: tuple[str, ...], check: str, default: Any = None) -> Any:
        node = _dig(self.data, keys)
        if node is None:
            if default is None:
                raise self.fail(keys, "missing")
            return default
        return self.check(keys, node, check)

    def check(self, keys: tuple[str, ...], v: Any, check: str) -> Any:
        ok, want = _CHECKS[check]
        if not ok(v):
            raise self.fail(keys, f"expected {want}, got {v!r}")
        return float(v) if check == "number" else v

    def build(self) -> Profile:
        self.table((), self.data, _TOP_KEYS)
        for section in ("channels", "validation", "phases", "ddp", "gradients", "loss"):
            self.table((section,), self.data.get(section, {}), None)
        rules = tuple(self.rule(rid, body) for rid, body in
                      self.table(("rules",), self.data.get("rules", {}), None).items()
                      if self.get(("rules", rid, "enabled"), "bool", True))
        diags = tuple(self.diagnosis(did, body) for did, body in
                      self.table(("diagnoses",), self.data.get("diagnoses", {}), None).items()
                      if self.get(("diagnoses", did, "enabled"), "bool", True))
        return Profile(
            name=self.get(("name",), "str", "custom"),
            source=self.user_path or self.default,
            knee_channel=self.get(("channels", "knee"), "str", ""),
            grf_channel=self.get(("channels", "grf"), "str", ""),
            knee_healthy_std=self.get(("validation", "knee_healthy_std"), "number"),
            grf_healthy_std=self.get(("validation", "grf_healthy_std"), "number"),
            phase_ends=tuple(self.get(("phases", "ends"), "ends", [])),
            desync_rel_tol=self.get(("ddp", "desync_rel_tol"), "number"),
            report_params=self.get(("gradients", "report_params"), "posint"),
            loss_terms=tuple(self.get(("loss", "terms"), "names", [])),
            rules=rules, diagnoses=diags)

    def condition(self, keys: tuple[str, ...], body: dict, extra: set[str]) -> Condition:
        kind = self.get(keys + ("kind",), "str")
        if kind not in KINDS:
            raise self.fail(keys + ("kind",), f"unknown kind {kind!r} (one of {sorted(KINDS)})")
        need = KINDS[kind]
        self.table(keys, body, {"kind", "metric", "latest", *need} | extra)
        metric = self.get(keys + ("metric",), "metric")
        if isinstance(metric, list) and kind not in _MULTI_METRIC:
            raise self.fail(keys + ("metric",), f"kind {kind!r} takes one metric name")
        if kind not in _MULTI_METRIC and metric.endswith("/*"):
            raise self.fail(keys + ("metric",), f"kind {kind!r} takes no pattern")
        checks = {"op": "op", "threshold": "number", "denominator": "str", "factor": "number",
                  "window": "posint", "min_count": "posint", "length": "posint"}
        fields = {f: self.get(keys + (f,), checks[f]) for f in need}
        if "window" in fields and fields["min_count"] > fields["window"]:
            raise self.fail(keys + ("min_count",), "is larger than window")
        metrics = (metric,) if isinstance(metric, str) else tuple(metric)
        return Condition(kind=kind, metrics=metrics,
                         latest=self.get(keys + ("latest",), "bool", False), **fields)

    def suggest(self, keys: tuple[str, ...]) -> tuple[tuple[str, float | str], ...]:
        """Config values a remedy is about: name -> the guide's value (or a phrase)."""
        table = self.table(keys, _dig(self.data, keys) or {}, None)
        return tuple((name, v if isinstance(v, str) else self.check(keys + (name,), v, "number"))
                     for name, v in table.items())

    def text(self, keys: tuple[str, ...], fields: dict[str, Any]) -> str:
        template = self.get(keys, "str")
        try:
            template.format(**fields)
        except (KeyError, IndexError, ValueError) as exc:
            raise self.fail(keys, f"bad message template ({type(exc).__name__}: {exc}); "
                                  f"it may name {sorted(fields)}") from None
        return template

    def rule(self, rid: str, body: Any) -> Rule:
        keys = ("rules", rid)
        self.table(keys, body, None)
        return Rule(
            id=rid, condition=self.condition(keys, body, _RULE_KEYS),
            severity=self.get(keys + ("severity",), "severity"),
            message=self.text(keys + ("message",), MESSAGE_FIELDS),
            remedy=self.get(keys + ("remedy",), "str", ""),
            phases=tuple(self.get(keys + ("phases",), "phases", [])),
            detail=self.get(keys + ("detail",), "detail", ""),
            suggest=self.suggest(keys + ("suggest",)))

    def diagnosis(self, did: str, body: Any) -> Diagnosis:
        keys = ("diagnoses", did)
        self.table(keys, body, _DIAG_KEYS)
        conds = self.table(keys + ("conditions",), body.get("conditions", {}), None)
        if not conds:
            raise self.fail(keys + ("conditions",), "a diagnosis needs at least one condition")
        parsed = tuple((name, self.condition(keys + ("conditions", name),
                                             self.table(keys + ("conditions", name), c, None),
                                             set())) for name, c in conds.items())
        require = self.get(keys + ("require",), "posint", len(parsed))
        if require > len(parsed):
            raise self.fail(keys + ("require",), f"exceeds the {len(parsed)} conditions")
        return Diagnosis(
            id=did, conditions=parsed, require=require,
            score=self.get(keys + ("score",), "bool", False),
            severity=self.get(keys + ("severity",), "severity"),
            cause=self.get(keys + ("cause",), "str"), remedy=self.get(keys + ("remedy",), "str"),
            phases=tuple(self.get(keys + ("phases",), "phases", [])),
            suggest=self.suggest(keys + ("suggest",)))


def _dig(data: dict, keys: tuple[str, ...]) -> Any:
    for k in keys:
        data = data.get(k) if isinstance(data, dict) else None
    return data
