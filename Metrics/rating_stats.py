"""Statistics of a human "real or generated?" study (rate_dataset.py): pure functions on answers.

Each answer is a dict, one line of a rater's answer file (`Pipeline/rating.py`):

    {"trial": 12, "kind": "pair",  "label": 3, "picked": "generated", ...}   # two-alternative forced choice
    {"trial": 40, "kind": "check", "label": 5, "picked": "real", ...}        # attention check (noise vs real)
    {"trial": 41, "kind": "single", "label": 1, "shown": "real", "score": 4, ...}   # realism rating 1-5

- **Exclusion** (`rater_status`): a rater is kept when they answered every trial
  of the study and failed at most `max_failed_checks` attention checks (an
  attention check pairs a real image with pure noise: picking the noise as real
  is a failure). Incomplete raters are excluded too, and counted apart.
- **Fooling rate** (`fooling_rate`): the share of the kept raters' pair trials in
  which the generated image was picked as the real one. 0.5 is indistinguishable
  (chance in a forced choice); 0 is always spotted. Its 95 % interval is Wilson's
  score interval (`wilson_interval`), which treats trials as independent: trials of
  one rater are not, so with few raters read it as a lower bound on the uncertainty.
- **Agreement** (`fleiss_kappa`, `pairwise_agreement`): over the pair trials that
  several kept raters answered (every rater sees the same pairs, in their own
  order and sides), the categories being "picked the real one" / "picked the
  generated one". Pairwise agreement is the share of rater pairs that agree on
  an item, averaged over items (Fleiss' P-bar); Fleiss' kappa corrects it for
  the agreement expected by chance from the overall category shares, in the form
  for items rated by different numbers of raters (each item's agreement uses its
  own n_i; Fleiss 1971, eq. for P_i). Kappa is undefined when every answer falls
  in one category.

Example:
    >>> wilson_interval(20, 80)
    (0.1681..., 0.3548...)
    >>> fleiss_kappa([[3, 1], [2, 2], [0, 4]])   # 3 items, 4 raters, counts of (real, generated) picks
    0.2000...
"""

import math
from collections import defaultdict

from Metrics.errors import MetricsError

Z_95 = 1.959963984540054  # the normal quantile of 0.975
KINDS = ("pair", "check", "single")


def wilson_interval(successes, n, z=Z_95):
    """Wilson's score interval (low, high) of a binomial proportion; (None, None) when n is 0."""
    if n < 0 or successes < 0 or successes > n:
        raise MetricsError(f"a proportion needs 0 <= successes <= n, got {successes} of {n}")
    if n == 0:
        return None, None
    p = successes / n
    z2 = z * z
    denominator = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    # At k = 0 and k = n the bound is exactly 0 or 1; the formula leaves a rounding error there.
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return low, high


def proportion(successes, n):
    """{"k", "n", "rate", "low", "high"}: the share and its 95 % Wilson interval (rate None when n is 0)."""
    low, high = wilson_interval(successes, n)
    return {"k": int(successes), "n": int(n), "rate": successes / n if n else None, "low": low, "high": high}


def _checked_counts(counts):
    rows = [list(map(int, row)) for row in counts]
    if any(len(row) != len(rows[0]) for row in rows) or any(v < 0 for row in rows for v in row):
        raise MetricsError("agreement needs one row of non-negative category counts per item, all of one length")
    return [row for row in rows if sum(row) >= 2]


def pairwise_agreement(counts):
    """Mean over items (rated by >= 2 raters) of the share of rater pairs that agree; None without such items.

    counts: one row per item, the number of raters who chose each category.
    """
    rows = _checked_counts(counts)
    if not rows:
        return None
    return sum(_item_agreement(row) for row in rows) / len(rows)


def fleiss_kappa(counts):
    """Fleiss' kappa of items rated by varying numbers (>= 2) of raters; None when undefined.

    P_i = (sum_j n_ij^2 - n_i) / (n_i (n_i - 1)), P = mean P_i, p_j = sum_i n_ij / sum_i n_i,
    P_e = sum_j p_j^2, kappa = (P - P_e) / (1 - P_e). Undefined without items rated
    twice, or when P_e is 1 (every answer in one category).
    """
    rows = _checked_counts(counts)
    if not rows:
        return None
    total = sum(sum(row) for row in rows)
    shares = [sum(row[j] for row in rows) / total for j in range(len(rows[0]))]
    expected = sum(p * p for p in shares)
    if expected >= 1 - 1e-12:
        return None
    observed = sum(_item_agreement(row) for row in rows) / len(rows)
    return (observed - expected) / (1 - expected)


def _item_agreement(row):
    n = sum(row)
    return (sum(v * v for v in row) - n) / (n * (n - 1))


def rater_status(answers, total_trials, max_failed_checks):
    """(kept, reason, failed checks, answered checks) of one rater's answers."""
    checks = [a for a in answers if a["kind"] == "check"]
    failed = sum(a["picked"] != "real" for a in checks)
    if len({a["trial"] for a in answers}) < total_trials:
        return False, "incomplete", failed, len(checks)
    if failed > max_failed_checks:
        return False, "failed attention checks", failed, len(checks)
    return True, "kept", failed, len(checks)


def fooling_rate(answers):
    """proportion() of pair answers that picked the generated image, overall and {label: ...} per class."""
    pairs = [a for a in answers if a["kind"] == "pair"]
    per_class = defaultdict(lambda: [0, 0])
    for a in pairs:
        per_class[a["label"]][0] += a["picked"] == "generated"
        per_class[a["label"]][1] += 1
    overall = proportion(sum(k for k, _ in per_class.values()), len(pairs))
    return overall, {label: proportion(k, n) for label, (k, n) in sorted(per_class.items())}


def agreement(answers_by_rater):
    """{"items", "raters_per_item", "pairwise", "fleiss_kappa"} over pair trials answered by >= 2 raters."""
    picks = defaultdict(lambda: [0, 0])  # trial -> [picked real, picked generated]
    for answers in answers_by_rater.values():
        for a in answers:
            if a["kind"] == "pair":
                picks[a["trial"]][a["picked"] == "generated"] += 1
    rows = [row for row in picks.values() if sum(row) >= 2]
    sizes = sorted({sum(row) for row in rows})
    return {"items": len(rows), "raters_per_item": sizes, "pairwise": pairwise_agreement(rows),
            "fleiss_kappa": fleiss_kappa(rows)}


def realism(answers):
    """{"real": {...}, "generated": {...}}: count, mean and 95 % normal interval of the 1-5 realism scores."""
    out = {}
    for shown in ("real", "generated"):
        scores = [a["score"] for a in answers if a["kind"] == "single" and a["shown"] == shown]
        n = len(scores)
        mean = sum(scores) / n if n else None
        sd = math.sqrt(sum((s - mean) ** 2 for s in scores) / (n - 1)) if n > 1 else None
        half = Z_95 * sd / math.sqrt(n) if sd is not None else None
        out[shown] = {"n": n, "mean": mean, "low": None if half is None else mean - half,
                      "high": None if half is None else mean + half}
    return out


def summarize(answers_by_rater, total_trials, max_failed_checks):
    """Every figure of the study's report from each rater's answers.

    Args:
        answers_by_rater: {rater id: [answer dicts]} (duplicates of a trial already removed).
        total_trials: how many trials (pairs, checks and single images) the study gives each rater.
        max_failed_checks: a rater failing more attention checks than this is excluded.
    """
    raters, kept = {}, {}
    for rater, answers in sorted(answers_by_rater.items()):
        ok, reason, failed, checks = rater_status(answers, total_trials, max_failed_checks)
        pairs = sum(a["kind"] == "pair" for a in answers)
        raters[rater] = {"kept": ok, "reason": reason, "failed_checks": failed, "checks": checks,
                         "answered": len(answers), "pair_trials": pairs}
        if ok:
            kept[rater] = answers
    kept_answers = [a for answers in kept.values() for a in answers]
    overall, per_class = fooling_rate(kept_answers)
    excluded = {r: s for r, s in raters.items() if not s["kept"]}
    return {
        "raters": raters,
        "raters_kept": len(kept),
        "raters_excluded": len(excluded),
        "excluded_failed_checks": sum(s["reason"] == "failed attention checks" for s in excluded.values()),
        "excluded_incomplete": sum(s["reason"] == "incomplete" for s in excluded.values()),
        "pair_trials_kept": overall["n"],
        "pair_trials_excluded": sum(s["pair_trials"] for s in excluded.values()),
        "fooling_rate": overall,
        "fooling_rate_per_class": per_class,
        "agreement": agreement(kept),
        "realism": realism(kept_answers),
        "max_failed_checks": max_failed_checks,
    }
