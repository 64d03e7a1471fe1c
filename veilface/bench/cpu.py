"""CPU time and memory of the benchmark's processes (psutil).

CPU seconds, unlike wall time, are not inflated by other jobs on a shared
machine, which is why ``bench identify`` reports ``us_per_template_core``
from them: the server's process tree (front process and scoring workers)
plus the client (this process and its encryption pool), per template
searched.
"""

from __future__ import annotations

import psutil

__all__ = ["client_cpu", "process_cpu", "tree_cpu", "tree_rss_mb"]


def process_cpu(p: psutil.Process) -> float:
    """User + system CPU seconds of one process (0 once it is gone)."""
    try:
        t = p.cpu_times()
    except psutil.NoSuchProcess:
        return 0.0
    return float(t.user + t.system)


def _tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    try:
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return [root]


def tree_cpu(pid: int) -> float:
    """CPU seconds of a process and its live children."""
    return sum(process_cpu(p) for p in _tree(pid))


def client_cpu(server_pid: int) -> float:
    """CPU seconds of this process and its children, the server's tree left out."""
    me = psutil.Process()
    skip = {p.pid for p in _tree(server_pid)}
    kids = [p for p in me.children(recursive=True) if p.pid not in skip]
    return process_cpu(me) + sum(process_cpu(p) for p in kids)


def tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and its live children, MiB (shared pages counted in each)."""
    total = 0
    for p in _tree(pid):
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return total / (1 << 20)
