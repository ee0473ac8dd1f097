"""The hardware probe: GPUs from sysfs and the vendor tools (rocm-smi, nvidia-smi), host memory, the Docker engine.

No torch: every tool runs as a subprocess with a timeout, so a wedged driver costs seconds, not a hang."""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    pass
from runner.preflight.memory import GiB

# Device memory per GPU as the vendor tools report it (rocm-smi / nvidia-smi), in GiB.
GPU_MEMORY_GIB = {"mi300x": 191.5, "mi250x": 64.0, "h100": 79.6, "h200": 140.4, "a100": 79.2}


GPU_VENDOR = {"mi300x": "amd", "mi250x": "amd", "h100": "nvidia", "h200": "nvidia", "a100": "nvidia"}


@dataclass
class Gpu:
    index: int
    vendor: str
    name: str
    memory_bytes: int


@dataclass
class Hardware:
    gpus: list[Gpu] = field(default_factory=list)
    kfd: bool = False
    nvidia: bool = False
    docker: str | None = None  # engine version when one answers
    host_memory_bytes: int = 0
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        if self.gpus:
            names: dict[str, int] = {}
            for g in self.gpus:
                key = f"{g.name} ({g.memory_bytes / GiB:.1f} GiB)"
                names[key] = names.get(key, 0) + 1
            gpus = ", ".join(f"{n} x {k}" for k, n in names.items())
        else:
            gpus = "no GPU (no /dev/kfd, no nvidia-smi)"
        eng = f"Docker engine {self.docker}" if self.docker else "no Docker engine answers"
        return f"{gpus}; {eng}; host memory {self.host_memory_bytes / GiB:.1f} GiB available"


def _run(cmd: list[str], timeout: float = 5.0) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return p.stdout if p.returncode == 0 else None


def _amd_gpus(notes: list[str]) -> list[Gpu]:
    gpus: list[Gpu] = []
    for card in sorted(Path("/sys/class/drm").glob("card[0-9]*")):
        dev = card / "device"
        vram = dev / "mem_info_vram_total"
        if "-" in card.name or not vram.exists():
            continue
        try:
            mem = int(vram.read_text().strip())
            name = (dev / "product_name").read_text().strip() if (dev / "product_name").exists() else "AMD GPU"
        except (OSError, ValueError):
            continue
        gpus.append(Gpu(len(gpus), "amd", name or "AMD GPU", mem))
    if gpus:
        return gpus
    out = _run(["rocm-smi", "--showmeminfo", "vram", "--json"])
    if out:
        try:
            data = json.loads(out)
            for i, (_, v) in enumerate(sorted(data.items())):
                total = next((int(x) for k, x in v.items() if "Total" in k and "VRAM" in k), 0)
                gpus.append(Gpu(i, "amd", "AMD GPU", total))
        except (ValueError, AttributeError, StopIteration):
            notes.append("rocm-smi answered in an unexpected format")
    return gpus


def _nvidia_gpus() -> list[Gpu]:
    out = _run(["nvidia-smi", "--query-gpu=index,name,memory.total", "--format=csv,noheader,nounits"])
    gpus = []
    for line in (out or "").splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 3 and parts[0].isdigit():
            gpus.append(Gpu(int(parts[0]), "nvidia", parts[1], int(float(parts[2]) * 1024**2)))
    return gpus


def _host_memory() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _docker_version() -> str | None:
    try:
        import docker

        c = docker.from_env(timeout=3)
        return str(c.version().get("Version", "?"))
    except Exception:
        return None


def probe_hardware(docker: bool = True) -> Hardware:
    """GPUs (AMD via /dev/kfd + sysfs or rocm-smi, NVIDIA via nvidia-smi), Docker engine, host memory."""
    hw = Hardware(kfd=Path("/dev/kfd").exists(), host_memory_bytes=_host_memory())
    if hw.kfd:
        hw.gpus += _amd_gpus(hw.notes)
        if not hw.gpus:
            hw.notes.append("/dev/kfd exists but no GPU memory could be read (sysfs, rocm-smi)")
    nv = _nvidia_gpus()
    hw.nvidia = bool(nv)
    hw.gpus += nv
    if docker:
        hw.docker = _docker_version()
    return hw
