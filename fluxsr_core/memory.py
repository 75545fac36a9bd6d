"""Free memory as the allocators see it: on a CUDA device, and in CPU memory.

One place for both readings, so every decision that weighs memory (the ``auto`` memory mode,
where the VAE tiling's whole-image activations wait, how much of them CPU memory may hold)
reads it the same way.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

MEMINFO, CGROUP = "/proc/meminfo", "/sys/fs/cgroup"  # Linux's; tests point them elsewhere


def free_device_bytes(device: Union[str, torch.device]) -> Optional[int]:
    """Bytes new tensors on ``device`` can still take: on CUDA the driver's free memory plus what
    torch's caching allocator holds reserved and unused (after a model runs, its freed
    activations stay reserved: ``torch.cuda.mem_get_info`` alone misses them; ComfyUI's
    ``get_free_memory`` counts them the same way). None off CUDA."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return int(free) + max(0, int(cached))


def available_cpu_bytes() -> Optional[int]:
    """CPU memory this process can still take: the system's available memory (psutil, which
    accelerate requires, on any system; else Linux's /proc/meminfo), and within a cgroup memory limit (a container's, v2 or v1) what is
    left under it; None where neither is known."""
    found = []
    try:
        import psutil

        found.append(int(psutil.virtual_memory().available))
    except Exception:  # noqa: BLE001 - not installed, or no reading on this system
        try:
            with open(MEMINFO) as meminfo:
                for line in meminfo:
                    if line.startswith("MemAvailable:"):
                        found.append(int(line.split()[1]) * 1024)
        except (OSError, ValueError, IndexError):
            pass
    # cgroup v2, then v1 (whose "no limit" is a number near 2**63)
    for cap_file, used_file in (("memory.max", "memory.current"),
                                ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):
        try:
            with open(f"{CGROUP}/{cap_file}") as f:
                cap = f.read().strip()
            if cap != "max" and int(cap) < 2 ** 60:
                with open(f"{CGROUP}/{used_file}") as f:
                    found.append(int(cap) - int(f.read().strip()))
            break
        except (OSError, ValueError):
            continue
    return min(found) if found else None


__all__ = ["free_device_bytes", "available_cpu_bytes"]
