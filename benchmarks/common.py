"""Shared benchmark helpers: interleaved timing with paired ratios, target checks, machine facts, tables.

Timing model: every variant being compared runs once per *round*, in a shuffled order, so that all
variants see the same background noise; a ratio is taken *within* each round (variant / reference)
and the reported ratio is the median of those paired ratios, with its interquartile range.
"""
from __future__ import annotations

import datetime as _dt
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout: this worktree's jlora comes first
    sys.path.insert(0, str(ROOT))


# ---------------------------------------------------------------------------------------------------
# timing

def _quantiles(xs: list[float]) -> tuple[float, float, float]:
    xs = sorted(xs)
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], statistics.median(xs), q[2]


def calibrate(fn: Callable[[], Any], min_sample_s: float) -> int:
    """Calls per sample so that one sample lasts at least ``min_sample_s`` (after one warm call)."""
    t0 = time.perf_counter()
    fn()
    dt = time.perf_counter() - t0
    return max(1, int(min_sample_s / max(dt, 1e-6)) + 1) if dt < min_sample_s else 1


class SelfTimed(float):
    """Returned by a variant that timed its own critical part (setup/cleanup excluded); seconds."""


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
CLOCK = os.environ.get("JLORA_BENCH_CLOCK", "wall")


def now() -> float:
    """The benchmark clock (``JLORA_BENCH_CLOCK``: "wall", the default, or "cpu")."""
    return CLOCKS[CLOCK]()


def interleaved(fns: dict[str, Callable[[], Any]], *, rounds: int, warmup: int = 2, min_sample_s: float = 0.05,
                inner: int | None = None, seed: int = 0, clock: str | None = None) -> dict[str, list[float]]:
    """Seconds per call of every variant, one sample per round each, variants in shuffled order per round.

    Each ``fn`` must block until its result is ready. ``inner`` calls per sample (the same for all
    variants, chosen from the slowest variant when not given) average out timer granularity. A ``fn``
    that returns :class:`SelfTimed` is credited with that time instead of its wall time.

    ``clock``: "wall" (default; ``JLORA_BENCH_CLOCK`` overrides) or "cpu" (this process's CPU time: time
    stolen by other processes on a busy machine is not counted; meaningful when pinned to one core,
    since with more threads it also counts their spin-waiting).
    """
    tick = CLOCKS[clock or CLOCK]
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    if inner is None:
        inner = min(calibrate(fn, min_sample_s) for fn in fns.values())
    rng = random.Random(seed)
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        order = list(fns)
        rng.shuffle(order)
        for name in order:
            fn = fns[name]
            t0 = tick()
            own = 0.0
            for _ in range(inner):
                out = fn()
                own = own + out if own is not None and isinstance(out, SelfTimed) else None
            wall = tick() - t0
            samples[name].append((own if own is not None else wall) / inner)
    return samples


def paired_ratio(samples: dict[str, list[float]], num: str, den: str) -> dict[str, float]:
    """Median and quartiles of the per-round ratio ``num / den`` (same round = same noise)."""
    ratios = [a / b for a, b in zip(samples[num], samples[den])]
    q1, med, q3 = _quantiles(ratios)
    return {"median": med, "q1": q1, "q3": q3, "min_ratio": min(samples[num]) / min(samples[den]), "n": len(ratios)}


def median_s(samples: dict[str, list[float]]) -> dict[str, float]:
    return {k: statistics.median(v) for k, v in samples.items()}


# ---------------------------------------------------------------------------------------------------
# targets

def check(value: float, limit: float, *, kind: str = "<=", noise: float | None = None) -> dict[str, Any]:
    """``{"met": bool, "text": ...}`` for ``value <= limit`` (kind "<=") or ``value >= limit`` (">=").

    A missed ``<=`` target is quantified by the excess over the limit (1.21 vs <= 1.10: "missed by
    0.110"), or as a multiple of the limit when far over; a missed ``>=`` target by the factor to gain.
    ``noise``: the measurement's resolution (from an A/A control); verdicts closer to the limit than
    that say so.
    """
    if kind == "<=":
        met = value <= limit
        over = value / limit
        by = f"{value - limit:.3f}" if value - limit >= 0.0005 else "<0.001"
        text = "met" if met else (f"MISSED by {by} ({value:.3f} vs <= {limit:g})" if over < 1.5 else
                                  f"MISSED: {value:.2f} vs <= {limit:g} ({over:.1f}x the limit)")
    else:
        met = value >= limit
        text = "met" if met else f"MISSED: {value:.1f}x vs >= {limit:g}x (needs {limit / value:.1f}x more)"
    close = noise is not None and abs(value - limit) <= noise
    if close:
        text += f" (within the A/A noise, +-{noise:.3f}: not conclusive)"
    return {"met": bool(met), "text": text, "value": value, "limit": limit, "kind": kind, "conclusive": not close}


def aa_noise(r: dict[str, float]) -> float:
    """Resolution of a ratio measurement from an A/A control (identical work): its bias or half its IQR."""
    return max(abs(r["median"] - 1.0), (r["q3"] - r["q1"]) / 2)


def fmt_ratio(r: dict[str, float], with_min: bool = True) -> str:
    text = f"{r['median']:.3f} [{r['q1']:.3f}-{r['q3']:.3f}]"
    return f"{text} ({r['min_ratio']:.3f})" if with_min else text


def fmt_time(s: float) -> str:
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.1f} ms" if s >= 0.1 else f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.0f} us"


def fmt_bytes(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def table(headers: list[str], rows: list[list[Any]]) -> str:
    """A GitHub-markdown table."""
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------
# machine

def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mem_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                return int(line.split()[1]) / 1e6
    except OSError:
        pass
    return None


def machine() -> dict[str, Any]:
    import importlib.metadata as md

    versions = {}
    for pkg in ("jax", "jaxlib", "flax", "optax", "torch", "transformers", "peft", "safetensors", "numpy"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = "-"
    import jax

    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "mem_gb": _mem_gb(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "jax_devices": [str(d) for d in jax.devices()],
        "loadavg_start": os.getloadavg(),
        "versions": versions,
    }


def write_section(lines: list[str]) -> Path:
    """Put a benchmark's section (``lines``, starting with its ``### `` heading) into ``benchmarks/RESULTS.md``:
    an earlier section with the same heading text up to its first ``(`` is replaced, else it is appended.

    Example:
        >>> write_section(["### Multi-adapter mixed batch (CPU, ...)", "", "| T | ... |"])
    """
    path = Path(__file__).resolve().parent / "RESULTS.md"
    key = lines[0].split("(")[0].strip()
    kept, skipping = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            skipping = line.split("(")[0].strip() == key
        if not skipping:
            kept.append(line)
    text = "\n".join(kept).rstrip("\n") + "\n\n" + "\n".join(lines) + "\n"
    path.write_text(text, encoding="utf-8")
    return path
