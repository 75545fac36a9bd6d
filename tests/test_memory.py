"""Free memory as fluxsr_core.memory reads it: a CUDA device's (its driver's and torch's cache's)
and the CPU's (the system's, within a container's limit)."""

import torch

from fluxsr_core import memory


def test_free_device_memory_counts_what_torchs_cache_holds_unused(monkeypatch):
    """After a model's forward its freed activations stay reserved by torch's caching allocator:
    the driver no longer counts them free, but new tensors can take them."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (3 * 2 ** 30, 80 * 2 ** 30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 10 * 2 ** 30)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 6 * 2 ** 30)
    assert memory.free_device_bytes("cuda:0") == 7 * 2 ** 30
    assert memory.free_device_bytes(torch.device("cuda", 0)) == 7 * 2 ** 30
    # a reading taken between the two calls can make the difference negative: never below the driver's
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 11 * 2 ** 30)
    assert memory.free_device_bytes("cuda") == 3 * 2 ** 30
    assert memory.free_device_bytes("cpu") is None
    assert memory.free_device_bytes("mps") is None


def test_auto_memory_mode_counts_torchs_cache_as_free(monkeypatch):
    """choose_memory_mode weighs the weights against the same free memory as the VAE tiling."""
    from fluxsr_core import models

    seen = []
    monkeypatch.setattr(models, "resolve_device", lambda device: torch.device("cuda", 0))
    monkeypatch.setattr(models, "transformer_config_of", lambda source: {})
    monkeypatch.setattr(models, "weight_bytes_per_mode", lambda config, vae_bytes, dtype: {"none": 1})
    monkeypatch.setattr(models, "_vae_bytes_of", lambda source, dtype: 0)
    monkeypatch.setattr(models, "resolve_dtype", lambda dtype, device: torch.bfloat16)
    monkeypatch.setattr(memory, "free_device_bytes", lambda device: 12345)
    monkeypatch.setattr(models, "pick_memory_mode", lambda weights, free, headroom: seen.append(free) or ("none", ""))
    models.choose_memory_mode("flux1-dev.safetensors", "ae.safetensors")
    assert seen == [12345]


def test_available_cpu_memory_is_the_least_of_the_system_and_the_container(tmp_path, monkeypatch):
    import sys

    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       32000000 kB\nMemFree:         1000000 kB\nMemAvailable:   20000000 kB\n")
    cgroup = tmp_path / "cgroup"
    cgroup.mkdir()
    monkeypatch.setitem(sys.modules, "psutil", None)  # not installed: /proc/meminfo is read
    monkeypatch.setattr(memory, "MEMINFO", str(meminfo))
    monkeypatch.setattr(memory, "CGROUP", str(cgroup))
    assert memory.available_cpu_bytes() == 20000000 * 1024  # no cgroup files: the system's
    (cgroup / "memory.max").write_text("max\n")
    assert memory.available_cpu_bytes() == 20000000 * 1024
    (cgroup / "memory.max").write_text(f"{8 * 2 ** 30}\n")
    (cgroup / "memory.current").write_text(f"{3 * 2 ** 30}\n")
    assert memory.available_cpu_bytes() == 5 * 2 ** 30  # a container's limit, less what it uses
    meminfo.unlink()
    assert memory.available_cpu_bytes() == 5 * 2 ** 30
    (cgroup / "memory.max").unlink()
    assert memory.available_cpu_bytes() is None
    (cgroup / "memory").mkdir()  # cgroup v1: "no limit" is a huge number
    (cgroup / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    (cgroup / "memory" / "memory.usage_in_bytes").write_text(f"{2 ** 30}\n")
    assert memory.available_cpu_bytes() is None
    (cgroup / "memory" / "memory.limit_in_bytes").write_text(f"{4 * 2 ** 30}\n")
    assert memory.available_cpu_bytes() == 3 * 2 ** 30


