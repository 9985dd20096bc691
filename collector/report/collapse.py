"""Which findings say the generated samples collapsed: read from the rules' metrics.

A rule is a validation-collapse finding when its condition reads a metric of the samples'
spread or diversity (``SPREAD_METRICS``, or a per-channel ``validation/<channel>_std``); a
diagnosis is one when any of its conditions does (the mode-collapse checklist reads
``validation/gen_std``). Read from the profile the report is given and from every profile
the collector ships, so a run judged by another bundled profile is still recognised;
``DOCUMENTED`` holds the guide's own ids for records judged by a profile not at hand::

    "knee_collapsed" in collapse_keys(load_profile(None))   # True
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from collector.analysis.profile import Condition, Profile, ProfileError
from collector.analysis.profile_load import load_profile

__all__ = ["DOCUMENTED", "SPREAD_METRICS", "collapse_keys", "reads_spread"]

# The samples' spread (the guide's sections 9-11) and diversity (beyond the guide).
SPREAD_METRICS = frozenset({
    "validation/gen_std", "validation/gen_range", "validation/knee_r_std",
    "validation/grf_vz_r_std", "validation/sample_diversity", "validation/duplicate_frac"})
# The guide's collapse findings by id; the profiles' own rules are read as well.
DOCUMENTED = frozenset({"gen_std_low", "gen_range_low", "knee_collapsed", "grf_collapsed",
                        "mode_collapse", "diagnosis/mode_collapse"})
_PROFILES = Path(__file__).resolve().parent.parent / "analysis" / "profiles"


def _spread(metric: str) -> bool:
    if metric in SPREAD_METRICS:
        return True
    if not metric.startswith("validation/"):
        return False
    # a pattern over validation/* covers the spread metrics; <channel>_std is a spread
    return metric.endswith(("/*", "_std"))


def reads_spread(cond: Condition) -> bool:
    """True when the condition reads a metric of the samples' spread or diversity."""
    return any(_spread(m) for m in (*cond.metrics, cond.denominator) if m)


def _of(profile: Profile) -> frozenset[str]:
    keys = {r.id for r in profile.rules if reads_spread(r.condition)}
    keys |= {f"diagnosis/{d.id}" for d in profile.diagnoses
             if any(reads_spread(c) for _, c in d.conditions)}
    return frozenset(keys)


@lru_cache(maxsize=1)
def _bundled() -> frozenset[str]:
    keys: set[str] = set()
    for path in sorted(_PROFILES.glob("*.toml")):
        try:
            keys |= _of(load_profile(path))
        except ProfileError:  # a shipped profile that fails to load is its own test's job
            continue
    return frozenset(keys)


@lru_cache(maxsize=8)
def _named(name: str) -> frozenset[str] | None:
    path = _PROFILES / f"{name}.toml"
    if not name or not path.is_file():
        return None
    try:
        return _of(load_profile(path))
    except ProfileError:
        return None


def collapse_keys(profile: Profile | None = None, judged_by: str = "") -> frozenset[str]:
    """Rule ids and ``diagnosis/<id>`` keys whose raising means the samples collapsed.

    ``judged_by``: the name of the profile the records say judged the run. A packaged one
    is read as shipped; ``profile`` (the report's own) when its name matches; with neither
    at hand, every packaged profile's collapse findings and the guide's ids count.
    """
    if profile is not None and (not judged_by or judged_by == profile.name):
        return DOCUMENTED | _of(profile)
    named = _named(judged_by)
    if named is not None:
        return DOCUMENTED | named
    return DOCUMENTED | _bundled() | (_of(profile) if profile is not None else frozenset())
