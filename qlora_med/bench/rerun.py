"""Does a bench run reproduce an earlier one? (``qlora-med bench --compare EARLIER/bench.json``)

Per (mix, variant) present in both runs, each quantity is checked two ways against the earlier run's stated spread,
its min-max over rounds: is the new median inside it, and do the two runs' min-max ranges overlap? Quantities:
tokens/s; MFU (tokens/s times FLOPs per token over the matmul peak that each run measured on its own machine, so a
machine that got faster or slower between the runs moves tokens/s but not MFU); ``x base`` (tokens/s over the
baseline's in the same round); and the absolute peak RSS (whose spread over rounds is a few MiB, so it also counts as
reproduced within ``RSS_TOLERANCE`` of the earlier median). The two runs' matmul peaks are set beside the table.

How often each check passes when nothing at all changed (:func:`chance_inside`, :func:`chance_overlap`): with n
rounds of pure noise, the new median lands inside the earlier min-max with probability 1 - 2 C(2n-k, n) / C(2n, n),
k = (n+1)//2 (0.60 for 3 rounds, 0.83 for 5), and the ranges overlap with probability 1 - 2 / C(2n, n) (0.90 for 3
rounds). The report prints both rates beside the counts, so a run is judged against what chance allows.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

RSS_TOLERANCE = 0.05
FORMATS = {"x base": "{:,.2f}", "MFU": "{:.1%}"}  # the rest: whole numbers


@dataclass(frozen=True)
class Check:
    """One quantity of one (mix, variant): the earlier run's median and min-max, the new median and min-max."""

    mix: str
    variant: str
    quantity: str
    then: float
    low: float
    high: float
    now: float
    now_low: float
    now_high: float
    tolerance: float = 0.0

    @property
    def change(self) -> float:
        return self.now / self.then - 1

    @property
    def reproduced(self) -> bool:
        """The new median inside the earlier min-max (or within ``tolerance`` of the earlier median)."""
        return self.low <= self.now <= self.high or abs(self.change) <= self.tolerance

    @property
    def overlaps(self) -> bool:
        """The two runs' min-max ranges share a value (or the medians are within ``tolerance``)."""
        return max(self.low, self.now_low) <= min(self.high, self.now_high) or abs(self.change) <= self.tolerance


def chance_inside(rounds: int) -> float:
    """P(new median inside the earlier min-max) for two runs of ``rounds`` i.i.d. rounds (nothing changed)."""
    k = (rounds + 1) // 2
    return 1 - 2 * math.comb(2 * rounds - k, rounds) / math.comb(2 * rounds, rounds)


def chance_overlap(rounds: int) -> float:
    """P(the two runs' min-max ranges overlap) for two runs of ``rounds`` i.i.d. rounds (nothing changed)."""
    return 1 - 2 / math.comb(2 * rounds, rounds)


def _series(report: dict) -> dict[tuple[str, str], dict[str, list[float]]]:
    """Per (mix, variant): per-round tokens/s, MFU, paired x base and peak RSS from a bench.json (x base recomputed
    from the rounds where an older file lacks it)."""
    rows = {(s["mix"], s["variant"]): s for s in report["summary"]}
    out = {}
    for (mix, variant), s in rows.items():
        base = rows.get((mix, "baseline"), {}).get("tok_s", [])
        x_base = s.get("x_base") or [t / b for t, b in zip(s["tok_s"], base, strict=False)]
        out[mix, variant] = {"tok/s": s["tok_s"], "MFU": s.get("mfu", []), "x base": x_base,
                             "peak RSS MiB": s["peak_rss_mib"]}
    return out


def compare(earlier: dict, now: dict) -> list[Check]:
    """Checks of ``now`` (a bench.json) against ``earlier`` for every (mix, variant) and quantity both have."""
    before, after = _series(earlier), _series(now)
    checks = []
    for key in [k for k in after if k in before]:
        for quantity, values in before[key].items():
            new = after[key][quantity]
            if values and new and not (quantity == "x base" and key[1] == "baseline"):
                tolerance = RSS_TOLERANCE if quantity == "peak RSS MiB" else 0.0
                checks.append(Check(*key, quantity, statistics.median(values), min(values), max(values),
                                    statistics.median(new), min(new), max(new), tolerance))  # fmt: skip
    return checks


def _peak(report: dict) -> float | None:
    peaks = report.get("matmul_peak") or {}
    entry = peaks.get(report.get("compute_dtype", "float32")) or peaks.get("float32")
    return entry["flops"] if entry else None


def render(earlier: dict, now: dict, checks: list[Check], source: str) -> str:
    """A markdown section: the checks table, a count per quantity beside what chance allows, both matmul peaks."""
    lines = [f"\n### Re-run against {source} ({earlier.get('date', '?')})\n",
             "| mix | variant | quantity | earlier median (min-max) | now (min-max) | change | median inside | "
             "ranges overlap |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for c in checks:
        fmt = FORMATS.get(c.quantity, "{:,.0f}").format
        lines.append(f"| {c.mix} | {c.variant} | {c.quantity} | {fmt(c.then)} ({fmt(c.low)}-{fmt(c.high)}) | "
                     f"{fmt(c.now)} ({fmt(c.now_low)}-{fmt(c.now_high)}) | {c.change:+.1%} | "
                     f"{'yes' if c.reproduced else 'no'} | {'yes' if c.overlaps else 'no'} |")  # fmt: skip
    rounds = min(report.get("spec", {}).get("rounds", 0) for report in (earlier, now))
    lines.append("")
    if rounds > 1:
        lines.append(f"With {rounds} rounds and nothing changed, a median lands inside the other run's min-max "
                     f"{chance_inside(rounds):.0%} of the time and the ranges overlap {chance_overlap(rounds):.0%}.")  # fmt: skip
    for quantity in dict.fromkeys(c.quantity for c in checks):
        group = [c for c in checks if c.quantity == quantity]
        extra = f" (or within {RSS_TOLERANCE:.0%})" if quantity == "peak RSS MiB" else ""
        changes = [c.change for c in group]
        lines.append(f"- {quantity}: {sum(c.reproduced for c in group)} of {len(group)} medians inside the earlier "
                     f"run's min-max{extra}, {sum(c.overlaps for c in group)} of {len(group)} ranges overlap; "
                     f"changes {min(changes):+.1%} to {max(changes):+.1%}")  # fmt: skip
    then_peak, now_peak = _peak(earlier), _peak(now)
    if then_peak and now_peak:
        lines.append(f"- matmul peak: {then_peak / 1e9:,.0f} then, {now_peak / 1e9:,.0f} GFLOP/s now "
                     f"({now_peak / then_peak - 1:+.1%}): the machine's own speed between the runs")  # fmt: skip
    return "\n".join(lines)
