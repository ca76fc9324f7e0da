"""The statistics a study reports (pure functions, scipy only): paired t-tests, Holm's step-down adjustment,
Bonferroni (simultaneous) intervals, the power of a two-sided paired t-test (noncentral t) and what follows from
it (the smallest detectable effect, the n needed for an effect), and a one-way nested variance decomposition
(between pretraining runs / between fine-tuning seeds)."""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

POWER = 0.8  # the power the report states detectable effects at
MAX_N = 10 ** 7  # n_needed gives up above this (an effect far inside the noise)


@dataclass(frozen=True)
class PairedTest:
    """A two-sided one-sample t-test of paired differences against 0."""

    mean: float
    sd: float  # sample sd (n - 1) of the differences
    n: int
    p: float | None  # None for fewer than 2 differences

    def interval(self, alpha: float) -> tuple[float, float] | None:
        """The two-sided (1 - alpha) t-interval of the mean difference; None for n < 2."""
        if self.n < 2:
            return None
        from scipy.stats import t

        half = float(t.ppf(1 - alpha / 2, self.n - 1)) * self.sd / math.sqrt(self.n)
        return self.mean - half, self.mean + half


def paired_test(diffs: Sequence[float]) -> PairedTest:
    """Mean, sample sd, n and two-sided p of the paired differences. Zero spread (all differences equal) is the
    limit of the t statistic: p = 0 for a non-zero mean, 1 for a zero one."""
    n = len(diffs)
    if n == 0:
        return PairedTest(math.nan, math.nan, 0, None)
    mean = sum(diffs) / n
    if n < 2:
        return PairedTest(mean, 0.0, 1, None)
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    if sd == 0:
        return PairedTest(mean, 0.0, n, 0.0 if mean != 0 else 1.0)
    from scipy.stats import t

    stat = mean / (sd / math.sqrt(n))
    return PairedTest(mean, sd, n, float(2 * t.sf(abs(stat), n - 1)))


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's (1979) step-down adjusted p-values, in the input order: the i-th smallest p times (m - i + 1),
    made non-decreasing along that order and capped at 1. Rejecting where adjusted p <= alpha controls the
    family-wise error rate at alpha."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def bonferroni_interval(test: PairedTest, family_size: int, level: float = 0.95) -> tuple[float, float] | None:
    """The simultaneous interval of one of `family_size` differences: the t-interval at 1 - (1 - level) / m."""
    return test.interval((1 - level) / max(1, family_size))


def paired_power(effect: float, sd: float, n: int, alpha: float) -> float:
    """Power of the two-sided paired t-test at level `alpha` with n pairs to detect a true mean difference
    `effect` when the differences have sd `sd`: P(|T| > t_crit) for T ~ noncentral t(n - 1, effect / (sd / sqrt n))."""
    from scipy.stats import nct, t

    df = n - 1
    crit = float(t.ppf(1 - alpha / 2, df))
    ncp = abs(effect) / (sd / math.sqrt(n))
    # P(T < -crit) as the upper tail of -T ~ nct(df, -ncp): scipy's lower-tail cdf returns NaN for a large ncp
    return float(nct.sf(crit, df, ncp) + nct.sf(crit, df, -ncp))


def detectable_effect(sd: float, n: int, alpha: float, power: float = POWER) -> float | None:
    """The smallest |mean difference| the paired t-test detects with `power` (n pairs, sd of the differences);
    None for n < 2 or an undefined sd, 0 for zero spread."""
    if n < 2 or not math.isfinite(sd):
        return None
    if sd == 0:
        return 0.0
    from scipy.optimize import brentq

    high = sd
    while paired_power(high, sd, n, alpha) < power:  # power rises with the effect: bracket, then solve
        high *= 2
    return float(brentq(lambda e: paired_power(e, sd, n, alpha) - power, 0.0, high, xtol=1e-9 * sd))


def n_needed(effect: float, sd: float, alpha: float, power: float = POWER) -> int | None:
    """The smallest number of pairs (>= 2) whose paired t-test detects `effect` with `power`; None when the sd is
    undefined or more than MAX_N pairs would be needed."""
    if not math.isfinite(sd) or effect == 0:
        return None
    if sd == 0:
        return 2
    effect = abs(effect)
    if paired_power(effect, sd, 2, alpha) >= power:
        return 2
    low, high = 2, 4  # power(low) < power <= power(high) once bracketed
    while paired_power(effect, sd, high, alpha) < power:
        low, high = high, high * 2
        if high > MAX_N:
            return None
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if paired_power(effect, sd, mid, alpha) >= power else (mid, high)
    return high


@dataclass(frozen=True)
class VarianceComponents:
    """One-way random-effects (nested) decomposition: fine-tuning seeds nested in pretraining runs."""

    sd_between: float  # between pretraining runs (sqrt of the ANOVA estimate, 0 when it is negative)
    sd_within: float  # between fine-tuning seeds of one pretraining run (pooled)
    runs: int
    sizes: tuple[int, ...]  # values per run

    @property
    def layout(self) -> str:
        """`3 x 8` (runs x values each), or `8 over 3 (3+3+2)` when the runs have different numbers of values."""
        if len(set(self.sizes)) == 1:
            return f"{self.runs} x {self.sizes[0]}"
        return f"{sum(self.sizes)} over {self.runs} ({'+'.join(map(str, self.sizes))})"


def variance_components(groups: Sequence[Sequence[float]]) -> VarianceComponents | None:
    """One-way random effects from groups (one per pretraining run, its fine-tuning seeds' values): the within-run
    variance is the pooled sample variance (MS_within); the between-run variance is (MS_between - MS_within) / n0,
    MS_between = sum n_i (mean_i - grand mean)^2 / (runs - 1), n0 = (N - sum n_i^2 / N) / (runs - 1) (n0 = n for
    equal groups). None unless there are >= 2 runs, each with a value, and more values than runs."""
    groups = [list(g) for g in groups]
    sizes = [len(g) for g in groups]
    total, k = sum(sizes), len(groups)
    if k < 2 or min(sizes) < 1 or total <= k:
        return None
    means = [sum(g) / len(g) for g in groups]
    grand = sum(v for g in groups for v in g) / total
    ms_within = sum((v - m) ** 2 for g, m in zip(groups, means, strict=True) for v in g) / (total - k)
    ms_between = sum(n * (m - grand) ** 2 for n, m in zip(sizes, means, strict=True)) / (k - 1)
    n0 = (total - sum(n * n for n in sizes) / total) / (k - 1)
    return VarianceComponents(math.sqrt(max(0.0, (ms_between - ms_within) / n0)), math.sqrt(ms_within), k,
                              tuple(sizes))
