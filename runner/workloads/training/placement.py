"""Where the ranks of a multi-process run landed: one line for the log, gathered from every rank."""

from __future__ import annotations

import socket
from typing import Any

import torch


def placement(acc: Any) -> str:
    """`ranks: 4 on 2 node(s) (node1 x2, node2 x2), backend gloo`; a collective, so every rank must call it.

    A multi-node job whose ranks all started on one host (a rendezvous that never left it) shows that here.
    """
    from accelerate.utils import gather_object

    hosts: list[str] = gather_object([socket.gethostname()])
    per_host = {h: hosts.count(h) for h in dict.fromkeys(hosts)}
    where = ", ".join(f"{h} x{n}" for h, n in per_host.items())
    backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else "none"
    return f"ranks: {len(hosts)} on {len(per_host)} node(s) ({where}), backend {backend}"


def collective_failure(acc: Any, e: BaseException, timeout_s: int) -> str:
    """The one error line of a rank whose collective failed (most often: another rank died)."""
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
    return (f"error: rank {acc.process_index} of {acc.num_processes}: a collective failed ({first}). Most often "
            f"another rank died or stopped answering (collectives time out after {timeout_s}s); run the same job "
            "again to resume from the last complete checkpoint")
