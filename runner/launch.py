"""The multi-node launch line: `accelerate launch` flags that each node fills in from the environment."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    pass


# Engine-neutral names the backends set on every node; the accelerate launch line reads them.
RANK_ENV = "RUNNER_NODE_RANK"


ADDR_ENV = "RUNNER_MASTER_ADDR"


PORT_ENV = "RUNNER_MASTER_PORT"


def multinode_argv(argv: list[str]) -> list[str]:
    """`accelerate launch ...` with each node's rank and the rendezvous address taken from the environment.

    The config file holds num_machines/num_processes; the per-node values can only be known on the node, so they
    are flags that expand ${RUNNER_NODE_RANK}, ${RUNNER_MASTER_ADDR} and ${RUNNER_MASTER_PORT} at launch.
    """
    if argv[:2] != ["accelerate", "launch"] or "--machine_rank" in argv:
        return list(argv)
    flags = [
        "--machine_rank",
        f"${{{RANK_ENV}}}",
        "--main_process_ip",
        f"${{{ADDR_ENV}}}",
        "--main_process_port",
        f"${{{PORT_ENV}}}",
    ]
    return argv[:2] + flags + argv[2:]
