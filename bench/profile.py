"""py-spy profiles of the relays: where the CPU goes, as top frames."""

from __future__ import annotations

import re
import shutil
import sys
from collections import Counter
from collections.abc import Callable
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
    """`relay (/work/main/bench/relays.py:97)` -> `relay (bench/relays.py)`: per function."""
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
    del line  # aggregate per function, not per line
    return f"{name} ({'/'.join(parts)})"


def library_resolver(pid: int) -> Callable[[str], str]:
    """Map a bare native address frame (`0x7f...`) to the library it lies in, using
    /proc/PID/maps (read while the process is alive)."""
    ranges: list[tuple[int, int, str]] = []
    try:
        with open(f"/proc/{pid}/maps") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 6 and parts[5].startswith("/"):
                    lo, hi = (int(x, 16) for x in parts[0].split("-"))
                    ranges.append((lo, hi, Path(parts[5]).name))
    except OSError:
        pass

    def resolve(frame: str) -> str:
        name = frame.split(" (", 1)[0]
        if not name.startswith("0x"):
            return frame
        try:
            addr = int(name, 16)
        except ValueError:
            return frame
        for lo, hi, lib in ranges:
            if lo <= addr < hi:
                return f"[{lib}, no symbols]"
        return "[native, no symbols]"

    return resolve


def top_frames(
    raw: str,
    *,
    inclusive: bool,
    limit: int = 12,
    resolve: Callable[[str], str] | None = None,
    python_only: bool = False,
) -> list[tuple[str, float]]:
    """Top frames of py-spy `--format raw` output, with their share of samples in percent.

    `inclusive=False` counts only the innermost frame of each sample (where time is spent);
    `inclusive=True` counts every frame on the stack once per sample (what it calls costs),
    leaving out the frames present in (nearly) every sample: the interpreter and event loop
    roots. `resolve` renames frames (e.g. native addresses to their library);
    `python_only` keeps only frames of Python source files (a per-Python-function view of a
    `--native` profile).
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
        if resolve is not None:
            frames = [resolve(f) for f in frames]
        if python_only:
            frames = [f for f in frames if ".py)" in f]
        if not frames:
            continue
        if inclusive:
            for frame in set(frames[1:]):  # skip the process/thread root
                counts[frame] += weight
        else:
            counts[frames[-1]] += weight
    if total == 0:
        return []
    ranked = [(frame, 100.0 * c / total) for frame, c in counts.most_common()]
    if inclusive:
        ranked = [(frame, share) for frame, share in ranked if share < 99.0]
    return ranked[:limit]


_SYSCALL = re.compile(
    r"^(?:\[pid\s+)?(?:\d+\]?\s+)?(read|write|writev|readv|sendmsg|recvmsg|sendto|recvfrom)"
    r"\((\d+),.*\)\s+=\s+(\d+)$"
)
SMALL = 1024


def syscall_counts(strace_text: str) -> dict[str, tuple[int, int]]:
    """Data syscalls of an `strace -f -e trace=...` log: `name` or `name <1KiB` -> (calls,
    bytes). Small calls are told apart: on a tunnel they are control frames, not payload."""
    out: dict[str, list[int]] = {}
    for line in strace_text.splitlines():
        m = _SYSCALL.match(line.strip())
        if m is None:
            continue
        name, nbytes = m.group(1), int(m.group(3))
        key = f"{name} <1KiB" if nbytes < SMALL else name
        entry = out.setdefault(key, [0, 0])
        entry[0] += 1
        entry[1] += nbytes
    return {k: (v[0], v[1]) for k, v in sorted(out.items())}
