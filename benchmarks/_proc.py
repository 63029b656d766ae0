"""Memory figures of processes, read from /proc (Linux)."""

from __future__ import annotations

from pathlib import Path


def kb_fields(path: str) -> dict[str, int]:
    """`Name: N kB` lines of a /proc file, in bytes; {} once the process is gone."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return {}
    out = {}
    for line in lines:
        name, _, value = line.partition(":")
        if value.endswith(" kB"):
            out[name] = int(value[:-3]) * 1024
    return out


def reset_peak_rss() -> None:
    """Start this process's peak resident size (VmHWM) again from its current size."""
    Path("/proc/self/clear_refs").write_text("5")
