"""`/proc/self/status` readings for the benchmark processes (standard library only: the TRL side imports it
from its own virtual environment)."""


def rss_gib(field: str = "VmRSS") -> float:
    """This process's `field` (VmRSS: resident now, VmHWM: peak) in GiB; NaN where /proc has no such line."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 2**20
    return float("nan")
