"""Loading the health rules: a TOML profile read, merged over its base and validated into
a frozen ``Profile`` (``collector.analysis.profile``).

The packaged default (``profiles/gait_diffusion.toml``) is the seed guide; ``generic``
(``profiles/generic.toml``) serves any model. A user's TOML overrides any key of its base
(``base = "generic"`` picks that one; the default otherwise), table by table, and may add
rules or switch them off:

    profile = load_profile("my_rules.toml")   # or load_profile(None) for the default
    profile = load_profile("generic")         # a packaged profile, by name
    profile.phase(120)                        # -> 2

Errors are ``ProfileError``s naming the file and the key, e.g.
``my_rules.toml: rules.stalled.length: expected a positive integer, got 0``.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from pathlib import Path
from typing import Any

from collector.analysis.profile import (
    DEFAULT_NAME,
    DETAILS,
    IMPROVEMENT_METHODS,
    KINDS,
    OPS,
    SEVERITIES,
    Condition,
    Diagnosis,
    Profile,
    ProfileError,
    Rule,
)

__all__ = ["DEFAULT_PATH", "PACKAGED", "load_profile", "with_stop_on"]

PROFILES_DIR = Path(__file__).parent / "profiles"
DEFAULT_PATH = PROFILES_DIR / f"{DEFAULT_NAME}.toml"
# Packaged profiles by name: what ``--rules NAME`` and a file's ``base = "NAME"`` refer to.
PACKAGED = {p.stem: p for p in sorted(PROFILES_DIR.glob("*.toml"))}
_MULTI_METRIC = ("threshold", "change")  # kinds that take a list or a pattern ("a/*_w1")
_OPTIONAL = {"slope": {"relative"}, "surge": {"floor"}}  # keys a kind may leave out
_HYSTERESIS_KEYS = {"raise_after", "clear_after"}
_RULE_KEYS = {"enabled", "severity", "message", "remedy", "phases", "detail", "suggest",
              "line"} | _HYSTERESIS_KEYS
_DIAG_KEYS = {"enabled", "severity", "cause", "remedy", "phases", "suggest", "require",
              "score", "conditions"} | _HYSTERESIS_KEYS
_TOP_KEYS = {"name", "base", "channels", "validation", "phases", "ddp", "gradients", "loss",
             "improvement", "hysteresis", "diversity", "reference", "remedies", "rules",
             "diagnoses", "actions"}
_ACTION_KEYS = {"stop_on", "stop_margin_s", "stop_min_steps"}
MAX_STOP_RULE = 256  # characters of a stop_on id (collector.recording.controls.MAX_RULE_LEN)
# What a message template may name; every kind fills the ones it knows, and ``held`` is
# how many judged epochs in a row the condition held when the rule was raised.
MESSAGE_FIELDS = dict(value=1.0, threshold=1.0, metric="m", median=1.0, factor=1.0,
                      previous=1.0, change=0.5, streak=1, count=1, slope=1.0,
                      denominator="d", window=1, length=1, min_count=1, held=1)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# Value checks by name: (predicate, what an error says was expected).
_CHECKS: dict[str, tuple[Any, str]] = {
    "str": (lambda v: isinstance(v, str), "a string"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "number": (lambda v: (_is_int(v) or isinstance(v, float)) and math.isfinite(v), "a number"),
    "posint": (lambda v: _is_int(v) and v > 0, "a positive integer"),
    "nonneg": (lambda v: (_is_int(v) or isinstance(v, float)) and math.isfinite(v) and v >= 0,
               "a number >= 0"),
    "positive": (lambda v: (_is_int(v) or isinstance(v, float)) and math.isfinite(v) and v > 0,
                 "a number > 0"),
    "method": (lambda v: isinstance(v, str) and v in IMPROVEMENT_METHODS,
               f"one of {IMPROVEMENT_METHODS}"),
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



def load_profile(path: str | Path | None = None) -> Profile:
    """The default profile; a packaged profile by name (``"generic"``); or the TOML at
    ``path`` merged over its ``base`` (the default unless the file names another)."""
    if path is None:
        return _Builder(_read(DEFAULT_PATH), {}, str(DEFAULT_PATH), None, DEFAULT_NAME,
                        switchable=True).build()
    if str(path) in PACKAGED and not Path(path).exists():
        name = str(path)
        return _Builder(_read(PACKAGED[name]), {}, str(PACKAGED[name]), None, name).build()
    user = _read(Path(path))
    base = user.get("base", DEFAULT_NAME)
    if not isinstance(base, str) or base not in PACKAGED:
        raise ProfileError(f"{path}: base: expected one of {sorted(PACKAGED)}, got {base!r}")
    data = _merge(_read(PACKAGED[base]), user)
    return _Builder(data, user, str(PACKAGED[base]), str(path), base).build()


def with_stop_on(profile: Profile, names: list[str], source: str = "--stop-on") -> Profile:
    """``profile`` with ``[actions] stop_on`` replaced (``trainwatch collect --stop-on``);
    a ProfileError names what the profile has no finding of."""
    return dataclasses.replace(profile, stop_on=_stop_on(profile, names, source))


def _stop_on(profile: Profile, names: list[str], where: str) -> tuple[str, ...]:
    long = [n for n in names if len(n) > MAX_STOP_RULE]
    if long:  # a stop is recorded with its finding's id, checked to this length on replay
        raise ProfileError(f"{where}: {long[0][:40]!r}... is longer than {MAX_STOP_RULE} "
                           "characters")
    unknown = [n for n in names if n not in profile.finding_ids]
    if unknown:
        raise ProfileError(f"{where}: no finding {unknown[0]!r} in profile {profile.name!r} "
                           f"(rules by id, diagnoses as diagnosis/<id>, e.g. "
                           f"diagnosis/gradient_explosion)")
    return tuple(dict.fromkeys(names))


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

    def __init__(self, data: dict, user: dict, default: str, user_path: str | None,
                 base: str, switchable: bool = False) -> None:
        self.data, self.user, self.default, self.user_path = data, user, default, user_path
        self.base, self.switchable = base, switchable

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
        return float(v) if check in ("number", "nonneg", "positive") else v

    def hysteresis(self, keys: tuple[str, ...]) -> tuple[int, int]:
        """(raise_after, clear_after) of a rule or diagnosis, else the [hysteresis] defaults."""
        return tuple(self.get(keys + (k,), "posint", self.get(("hysteresis", k), "posint", 1))
                     for k in ("raise_after", "clear_after"))  # type: ignore[return-value]

    def build(self) -> Profile:
        self.table((), self.data, _TOP_KEYS)
        for section in ("channels", "validation", "phases", "ddp", "gradients", "loss",
                        "improvement", "diversity", "reference", "remedies"):
            self.table((section,), self.data.get(section, {}), None)
        self.table(("hysteresis",), self.data.get("hysteresis", {}), _HYSTERESIS_KEYS)
        self.table(("actions",), self.data.get("actions", {}), _ACTION_KEYS)
        actual = self.table(("remedies", "actual"), _dig(self.data, ("remedies", "actual"))
                            or {}, None)
        for k, v in actual.items():
            self.check(("remedies", "actual", k), v, "str")
        knee = self.get(("channels", "knee"), "str", "")
        grf = self.get(("channels", "grf"), "str", "")
        rules = tuple(self.rule(rid, body) for rid, body in
                      self.table(("rules",), self.data.get("rules", {}), None).items()
                      if self.get(("rules", rid, "enabled"), "bool", True))
        diags = tuple(self.diagnosis(did, body) for did, body in
                      self.table(("diagnoses",), self.data.get("diagnoses", {}), None).items()
                      if self.get(("diagnoses", did, "enabled"), "bool", True))
        profile = Profile(
            name=self.get(("name",), "str", "custom"),
            source=self.user_path or self.default,
            knee_channel=knee, grf_channel=grf,
            # a channel switched off needs no healthy threshold
            knee_healthy_std=self.get(("validation", "knee_healthy_std"), "number",
                                      None if knee else 0.0),
            grf_healthy_std=self.get(("validation", "grf_healthy_std"), "number",
                                     None if grf else 0.0),
            phase_ends=tuple(self.get(("phases", "ends"), "ends", [])),
            desync_rel_tol=self.get(("ddp", "desync_rel_tol"), "number"),
            report_params=self.get(("gradients", "report_params"), "posint"),
            loss_terms=tuple(self.get(("loss", "terms"), "names", [])),
            rules=rules, diagnoses=diags,
            improvement_method=self.get(("improvement", "method"), "method"),
            improvement_margin=self.get(("improvement", "margin"), "nonneg"),
            improvement_window=self.get(("improvement", "window"), "posint", 5),
            duplicate_rms=self.get(("diversity", "duplicate_rms"), "positive"),
            max_windows=self.get(("diversity", "max_windows"), "posint"),
            max_pairs=self.get(("diversity", "max_pairs"), "posint"),
            max_values=self.get(("diversity", "max_values"), "posint"),
            reference_block_rows=self.get(("reference", "block_rows"), "posint"),
            reference_max_values=self.get(("reference", "max_values"), "posint"),
            actual=tuple(actual.items()), base=self.base, switchable=self.switchable,
            stop_margin_s=self.get(("actions", "stop_margin_s"), "positive", 10.0),
            stop_min_steps=self.get(("actions", "stop_min_steps"), "posint", 10))
        names = self.get(("actions", "stop_on"), "names", [])
        try:
            return with_stop_on(profile, names, "")
        except ProfileError as exc:
            raise self.fail(("actions", "stop_on"), str(exc).removeprefix(": ")) from None

    def condition(self, keys: tuple[str, ...], body: dict, extra: set[str]) -> Condition:
        kind = self.get(keys + ("kind",), "str")
        if kind not in KINDS:
            raise self.fail(keys + ("kind",), f"unknown kind {kind!r} (one of {sorted(KINDS)})")
        need = KINDS[kind]
        optional = {"latest"} | _OPTIONAL.get(kind, set())
        self.table(keys, body, {"kind", "metric", *optional, *need} | extra)
        metric = self.get(keys + ("metric",), "metric")
        if isinstance(metric, list) and kind not in _MULTI_METRIC:
            raise self.fail(keys + ("metric",), f"kind {kind!r} takes one metric name")
        if kind not in _MULTI_METRIC and "*" in metric:
            raise self.fail(keys + ("metric",), f"kind {kind!r} takes no pattern")
        checks = {"op": "op", "threshold": "number", "denominator": "str", "factor": "number",
                  "window": "posint", "min_count": "posint", "length": "posint"}
        fields = {f: self.get(keys + (f,), checks[f]) for f in need}
        if "window" in fields and fields["min_count"] > fields["window"]:
            raise self.fail(keys + ("min_count",), "is larger than window")
        metrics = (metric,) if isinstance(metric, str) else tuple(metric)
        return Condition(kind=kind, metrics=metrics,
                         latest=self.get(keys + ("latest",), "bool", False),
                         relative=self.get(keys + ("relative",), "bool", False),
                         floor=self.get(keys + ("floor",), "nonneg", 0.0), **fields)

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
        raise_after, clear_after = self.hysteresis(keys)
        line = self.get(keys + ("line",), "bool", False)
        if line and self.get(keys + ("kind",), "str") != "threshold":
            raise self.fail(keys + ("line",), "only a threshold rule has a line to draw")
        return Rule(
            id=rid, condition=self.condition(keys, body, _RULE_KEYS),
            severity=self.get(keys + ("severity",), "severity"),
            message=self.text(keys + ("message",), MESSAGE_FIELDS),
            remedy=self.get(keys + ("remedy",), "str", ""),
            phases=tuple(self.get(keys + ("phases",), "phases", [])),
            detail=self.get(keys + ("detail",), "detail", ""),
            suggest=self.suggest(keys + ("suggest",)),
            raise_after=raise_after, clear_after=clear_after, line=line)

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
        raise_after, clear_after = self.hysteresis(keys)
        return Diagnosis(
            id=did, conditions=parsed, require=require,
            score=self.get(keys + ("score",), "bool", False),
            severity=self.get(keys + ("severity",), "severity"),
            cause=self.get(keys + ("cause",), "str"), remedy=self.get(keys + ("remedy",), "str"),
            phases=tuple(self.get(keys + ("phases",), "phases", [])),
            suggest=self.suggest(keys + ("suggest",)),
            raise_after=raise_after, clear_after=clear_after)


def _dig(data: dict, keys: tuple[str, ...]) -> Any:
    for k in keys:
        data = data.get(k) if isinstance(data, dict) else None
    return data
