"""GPU device access for containers: the AMD nodes (/dev/kfd, one render node per GPU) and their groups."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    pass


KFD_TOPOLOGY = Path("/sys/class/kfd/kfd/topology/nodes")


FIRST_RENDER_MINOR = 128


def kfd_render_minors(topology: Path = KFD_TOPOLOGY) -> list[int]:
    """DRM render minors of the AMD GPUs, in KFD node order (CPU nodes have no SIMDs and are skipped)."""
    minors: list[tuple[int, int]] = []
    if not topology.is_dir():
        return []
    for node in topology.iterdir():
        try:
            props = dict(
                line.split(None, 1) for line in (node / "properties").read_text().splitlines() if " " in line
            )
            if int(props.get("simd_count", "0")) > 0 and int(props.get("drm_render_minor", "0")) > 0:
                minors.append((int(node.name), int(props["drm_render_minor"])))
        except (OSError, ValueError):
            continue
    return [m for _, m in sorted(minors)]


def amd_device_flags(gpus: int, render_minors: list[int] | None = None) -> dict[str, Any]:
    """What an AMD GPU container needs (AMD's docs): /dev/kfd, the render node of each GPU it gets (all of
    /dev/dri when the count is 0), the video group, host IPC, ptrace for the debugger/profiler and no seccomp."""
    if gpus > 0:
        minors = (render_minors or [FIRST_RENDER_MINOR + i for i in range(gpus)])[:gpus]
        devices = ["/dev/kfd"] + [f"/dev/dri/renderD{m}" for m in minors]
    else:
        devices = ["/dev/kfd", "/dev/dri"]
    return {
        "devices": devices,
        "group_add": ["video"],
        "ipc_mode": "host",
        "cap_add": ["SYS_PTRACE"],
        "security_opt": ["seccomp=unconfined"],
    }


def device_gids(devices: list[str]) -> list[str]:
    """Numeric groups owning the device nodes (e.g. `render`), which the container user must be in."""
    gids: list[str] = []
    for d in devices:
        try:
            gid = str(os.stat(d).st_gid)
        except OSError:
            continue
        if gid != "0" and gid not in gids:
            gids.append(gid)
    return gids
