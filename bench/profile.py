"""py-spy profiles of the relays: where the CPU goes, as top frames."""

from __future__ import annotations

import shutil
import sys
from collections import Counter
from pathlib import Path


def py_spy_binary() -> str:
    """The py-spy executable next to this interpreter, or on PATH."""
    local = Path(sys.executable).with_name("py-spy")
    if local.exists():
        return str(local)
    found = shutil.which("py-spy")
    if found is None:
        raise RuntimeError(
            "py-spy is not installed: `.venv/bin/pip install py-spy` (used for profiling only)"
        )
    return found


def _short(frame: str) -> str:
    """`relay (/work/main/bench/relays.py:97)` -> `relay (bench/relays.py:97)`."""
    name, _, where = frame.partition(" (")
    if not where:
        return frame
    path, _, line = where.rstrip(")").rpartition(":")
    parts = Path(path).parts
    for anchor in ("site-packages", "lib"):
        if anchor in parts:
            parts = parts[len(parts) - parts[::-1].index(anchor) :]
            break
    else:
        parts = parts[-2:]
    return f"{name} ({'/'.join(parts)}:{line})"


def top_frames(raw: str, *, inclusive: bool, limit: int = 12) -> list[tuple[str, float]]:
    """Top frames of py-spy `--format raw` output, with their share of samples in percent.

    `inclusive=False` counts only the innermost frame of each sample (where time is spent);
    `inclusive=True` counts every frame on the stack once per sample (what it calls costs).
    """
    counts: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        weight = int(n)
        total += weight
        frames = [_short(f) for f in stack.split(";") if f]
        if not frames:
            continue
        if inclusive:
            for frame in set(frames[1:]):  # skip the process/thread root
                counts[frame] += weight
        else:
            counts[frames[-1]] += weight
    if total == 0:
        return []
    return [(frame, 100.0 * c / total) for frame, c in counts.most_common(limit)]
