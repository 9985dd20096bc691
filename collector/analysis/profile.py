"""The health rules as data: the frozen, validated ``Profile`` a TOML profile is loaded
into (``collector.analysis.profile_load``), and its rules, diagnoses and conditions.

    profile = load_profile("my_rules.toml")   # collector.analysis.profile_load
    profile.phase(120)                        # -> 2
    profile.finding_ids                       # what events and stop actions name
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

__all__ = ["DEFAULT_NAME", "Condition", "Diagnosis", "Profile", "ProfileError", "Rule",
           "matches"]

DEFAULT_NAME = "gait_diffusion"  # the packaged profile a user's file is built on
IMPROVEMENT_METHODS = ("guide", "best", "trend")

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
class ProfileError(ValueError):
    """A profile file that cannot be used; the message names the file and the key."""


def matches(pattern: str, name: str) -> bool:
    """A metric name against a rule's metric: exact, or a pattern with ``*`` ("a/*_w1")."""
    return fnmatch.fnmatchcase(name, pattern) if "*" in pattern else name == pattern


@dataclass(frozen=True)
class Condition:
    """One test on the epoch's metrics (and the run's history of them)."""

    kind: str
    metrics: tuple[str, ...]  # a name with "*" matches every metric it fits ("loss_ratio/*")
    op: str = ">"
    threshold: float = 0.0
    denominator: str = ""
    factor: float = 0.0
    window: int = 0
    min_count: int = 0
    length: int = 0
    latest: bool = False  # judge an absent metric by its latest value
    relative: bool = False  # slope: in % of the window's mean value per epoch
    floor: float = 0.0  # surge: values below it are too small to judge


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
    raise_after: int = 1  # judged epochs in a row the condition holds before it is raised
    clear_after: int = 1  # judged epochs in a row it does not hold before it clears
    line: bool = False  # its threshold is drawn beside the metric (threshold/<name>)


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
    raise_after: int = 1
    clear_after: int = 1


@dataclass(frozen=True)
class Profile:
    name: str
    source: str  # the user's file, or the packaged profile's path
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
    improvement_method: str = "best"  # how train/is_improving is judged (see the TOML)
    improvement_margin: float = 0.0  # standard errors the improvement must exceed
    improvement_window: int = 5  # "trend": epochs the slope is fitted over
    duplicate_rms: float = 0.1  # near-duplicate pair: distance < this x data's median
    max_windows: int = 256  # training windows the diversity reference holds
    max_pairs: int = 4096  # sample pairs compared per validation
    max_values: int = 16384  # values per channel and side in W1
    reference_block_rows: int = 4096  # the kept training subsample: blocks of rows...
    reference_max_values: int = 2_097_152  # ...holding at most this many raw values
    actual: tuple[tuple[str, str], ...] = ()  # config key -> metric with the run's own value
    base: str = DEFAULT_NAME  # the packaged profile this one is built on
    switchable: bool = False  # the unmodified default: RunHealth may pick ``generic``
    stop_on: tuple[str, ...] = ()  # [actions]: findings (rule ids) that stop a run
    stop_margin_s: float = 10.0  # seconds of steps between a stop decision and its step
    stop_min_steps: int = 10  # the stop step is at least this far past the highest seen

    def phase(self, epoch: int) -> int:
        for i, end in enumerate(self.phase_ends):
            if epoch <= end:
                return i + 1
        return len(self.phase_ends) + 1

    def diagnosis(self, did: str) -> Diagnosis | None:
        return next((d for d in self.diagnoses if d.id == did), None)

    @property
    def finding_ids(self) -> tuple[str, ...]:
        """What events name: every rule's id and ``diagnosis/<id>`` for each diagnosis."""
        return tuple(r.id for r in self.rules) + tuple(f"diagnosis/{d.id}"
                                                       for d in self.diagnoses)

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
    def lines(self) -> tuple[tuple[str, float], ...]:
        """(metric or pattern, value): the thresholds drawn beside validation metrics as
        ``threshold/<name>`` series (the guide's two healthy lines, then rules with
        ``line = true``); emitted in the records at epochs that have the metric."""
        out = [(f"validation/{k.removeprefix('threshold/')}", v)
               for k, v in self.thresholds.items()]
        out += [(m, r.condition.threshold) for r in self.rules if r.line
                for m in r.condition.metrics]
        return tuple(out)

    @property
    def history_len(self) -> int:
        """How many past values of a metric the rules can look at."""
        conds = [r.condition for r in self.rules]
        conds += [c for d in self.diagnoses for _, c in d.conditions]
        return 1 + max([max(c.window, c.length) for c in conds] + [1])


