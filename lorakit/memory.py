"""This process's memory, as Linux reports it (``/proc/self``): the resident size now and its
peak since the last reset. A module of its own, below every package, because training
(per-rank load peaks), the planner's measurements and tests all read it."""

from __future__ import annotations


def rss_bytes(field: str = "VmRSS") -> int:
    """This process's ``field`` of /proc/self/status in bytes (``VmRSS`` now, ``VmHWM`` peak)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not found in /proc/self/status")


def reset_peak_rss() -> bool:
    """Reset this process's peak resident size (Linux >= 4.0); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
