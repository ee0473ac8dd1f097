"""Small pure-Python statistics for comparing evals: McNemar's paired test and the Wilson interval.

No numpy or torch: the CLI (`runner compare`) and the registry's promotion gate use these on the host.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

Method = Literal["auto", "exact", "chi2", "chi2_cc"]


def finite(v: Any) -> float | None:
    """`v` as a float when it is a finite number (not a bool), else None: a NaN accuracy is no measurement."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def _binom_two_sided(k: int, n: int) -> float:
    """Two-sided exact binomial p-value for k successes out of n at p = 0.5 (doubled smaller tail)."""
    k = min(k, n - k)
    # Sum in log space: comb(n, i) / 2**n overflows floats past n ~ 1000.
    log_half_n = n * math.log(2)
    tail = sum(math.exp(math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - log_half_n)
               for i in range(k + 1))
    return min(1.0, 2 * tail)


def mcnemar(b: int, c: int, method: Method = "auto") -> float:
    """Two-sided p-value of McNemar's test from the discordant pairs.

    b: questions only the first model got right; c: only the second. `exact` is the binomial test on b of b+c;
    `chi2_cc` the chi-square with continuity correction, (|b-c|-1)^2/(b+c); `chi2` without it;
    `auto` is exact below 25 discordant pairs and chi2_cc above (the usual rule).
    """
    if b < 0 or c < 0:
        raise ValueError("counts must be >= 0")
    n = b + c
    if n == 0:
        return 1.0
    if method == "auto":
        method = "exact" if n < 25 else "chi2_cc"
    if method == "exact":
        return _binom_two_sided(b, n)
    d = abs(b - c)
    if method == "chi2_cc":
        d = max(d - 1, 0)
    elif method != "chi2":
        raise ValueError(f"unknown method {method!r}")
    chi2 = d * d / n
    return math.erfc(math.sqrt(chi2 / 2))  # survival function of chi-square with 1 degree of freedom


@dataclass(frozen=True)
class PairedResult:
    n: int  # questions both evals answered
    both_right: int
    only_first: int  # b
    only_second: int  # c
    both_wrong: int
    p_value: float
    method: str

    @property
    def accuracy_first(self) -> float:
        return (self.both_right + self.only_first) / self.n if self.n else 0.0

    @property
    def accuracy_second(self) -> float:
        return (self.both_right + self.only_second) / self.n if self.n else 0.0


def paired_mcnemar(first: Mapping[str, bool], second: Mapping[str, bool], method: Method = "auto") -> PairedResult:
    """McNemar's test on the questions (ids) both evals share: {id: correct} each."""
    common = sorted(set(first) & set(second))
    both = sum(1 for q in common if first[q] and second[q])
    b = sum(1 for q in common if first[q] and not second[q])
    c = sum(1 for q in common if second[q] and not first[q])
    used = method if method != "auto" else ("exact" if b + c < 25 else "chi2_cc")
    return PairedResult(len(common), both, b, c, len(common) - both - b - c, mcnemar(b, c, method), used)


def wilson_interval(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k/n."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, mid - half), min(1.0, mid + half)
