"""The statistics of the report: means with t confidence intervals, paired and unpaired t-tests, and
Holm's correction for the number of tests."""

from __future__ import annotations

import math
import warnings

CONFIDENCE = 0.95


def _finite(values) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def mean_ci(values, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """(mean, half-width of the two-sided t confidence interval); the half-width is NaN for n < 2."""
    from scipy import stats

    xs = _finite(values)
    n = len(xs)
    if n == 0:
        return math.nan, math.nan
    mean = sum(xs) / n
    if n < 2:
        return mean, math.nan
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    return mean, float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)


def welch(a, b) -> tuple[float, float, float]:
    """Welch's unequal-variance t-test of a against b: (t, two-sided p, degrees of freedom); NaN where
    undefined (fewer than two values on a side, or no variance on either)."""
    from scipy import stats

    a, b = _finite(a), _finite(b)
    if len(a) < 2 or len(b) < 2:
        return math.nan, math.nan, math.nan
    va = sum((x - sum(a) / len(a)) ** 2 for x in a) / (len(a) - 1)
    vb = sum((x - sum(b) / len(b)) ** 2 for x in b) / (len(b) - 1)
    if va == 0 and vb == 0:
        return math.nan, math.nan, math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = stats.ttest_ind(a, b, equal_var=False)
    se2 = va / len(a) + vb / len(b)
    df = se2 ** 2 / ((va / len(a)) ** 2 / (len(a) - 1) + (vb / len(b)) ** 2 / (len(b) - 1))
    return float(r.statistic), float(r.pvalue), float(df)


def paired(a: dict, b: dict, confidence: float = CONFIDENCE) -> dict:
    """Paired t-test of a against b over the keys (seeds) both hold a finite value for: the mean
    difference a - b with its t confidence interval, t, the two-sided p and n. NaN where undefined
    (fewer than two pairs, or every difference equal)."""
    from scipy import stats

    keys = sorted(k for k in a if k in b and a[k] is not None and b[k] is not None
                  and math.isfinite(float(a[k])) and math.isfinite(float(b[k])))
    d = [float(a[k]) - float(b[k]) for k in keys]
    mean, ci = mean_ci(d, confidence)
    out = dict(n=len(d), diff=mean, diff_ci=ci, t=math.nan, p=math.nan)
    if len(d) >= 2 and any(x != d[0] for x in d):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            r = stats.ttest_rel([float(a[k]) for k in keys], [float(b[k]) for k in keys])
        out.update(t=float(r.statistic), p=float(r.pvalue))
    return out


def holm(pvalues: list[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (same order; NaN stays NaN and does not count as a test)."""
    idx = [i for i, p in enumerate(pvalues) if p is not None and math.isfinite(p)]
    m = len(idx)
    out = [math.nan] * len(pvalues)
    running = 0.0
    for rank, i in enumerate(sorted(idx, key=lambda i: pvalues[i])):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        out[i] = running
    return out


__all__ = ["CONFIDENCE", "holm", "mean_ci", "paired", "welch"]
