"""CUDA graphs for the answer service's scoring forward.

A served question is a short prompt; on a GPU its forward pass is bound by launching a thousand small kernels
from Python, not by arithmetic. `GraphedDecoder` records the decoder's forward for a grid of small shapes (rows x
tokens, up to `max_tokens` in all) once, at start-up, and replays a recording for each batch: the batch is
copied into the recording's input buffer (right-padded to the bucket: exact, since with a causal model a real
token never attends to the pads after it), the graph replays, and the hidden states at each row's last real
token come out. Shapes outside the grid run eagerly; so does everything when a capture fails (logged once).
"""

from __future__ import annotations

import threading
import time
from typing import Any

import torch

from runner.workloads.scoring.scorer import fast_path_parts

ROW_BUCKETS = (1, 2, 4, 8, 16, 32)
TOKEN_BUCKETS = (64, 128, 192, 256, 384, 512)
MAX_TOKENS = 2048  # rows x tokens; larger batches are compute-bound: a graph gains nothing and its padding costs


def bucket(rows: int, tokens: int, max_tokens: int = MAX_TOKENS) -> tuple[int, int] | None:
    """The smallest recorded shape that holds a [rows, tokens] batch, or None (run eagerly)."""
    r = next((b for b in ROW_BUCKETS if b >= rows), None)
    t = next((b for b in TOKEN_BUCKETS if b >= tokens), None)
    if r is None or t is None or r * t > max_tokens:
        return None
    return r, t


def grid(max_tokens: int = MAX_TOKENS) -> list[tuple[int, int]]:
    return [(r, t) for r in ROW_BUCKETS for t in TOKEN_BUCKETS if r * t <= max_tokens]


class GraphedDecoder:
    """Recorded forwards of `decoder` (input ids -> hidden state at each row's last token), one per bucket."""

    def __init__(self, decoder: Any, pad_id: int, device: torch.device, log: Any = print,
                 max_tokens: int = MAX_TOKENS) -> None:
        self.decoder = decoder
        self.pad_id = pad_id
        self.device = device
        self.log = log
        self.max_tokens = max_tokens
        self.pool = torch.cuda.graph_pool_handle() if device.type == "cuda" else None
        self.graphs: dict[tuple[int, int], tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.failed: str | None = None
        self.lock = threading.Lock()  # one replay at a time: the recordings share input buffers and memory
        self.replays = 0

    @torch.no_grad()
    def capture_all(self) -> int:
        """Record every bucket of the grid; returns how many (0 when capturing failed)."""
        t0 = time.perf_counter()
        for key in grid(self.max_tokens):
            if self._capture(key) is None:
                return 0
        self.log(f"cuda graphs: {len(self.graphs)} shapes recorded in {time.perf_counter() - t0:.1f} s")
        return len(self.graphs)

    def _capture(self, key: tuple[int, int]) -> Any:
        if self.failed:
            return None
        rows, tokens = key
        ids = torch.full((rows, tokens), self.pad_id, dtype=torch.long, device=self.device)
        last = torch.zeros(rows, dtype=torch.long, device=self.device)
        index = torch.arange(rows, device=self.device)

        def forward() -> torch.Tensor:
            return self.decoder(input_ids=ids, use_cache=False).last_hidden_state[index, last]

        try:
            graph, out = self._record(forward)
        except Exception as e:  # a model whose forward cannot be recorded still answers, eagerly
            self.failed = f"{type(e).__name__}: {e}"
            self.graphs.clear()
            self.log(f"cuda graphs: recording failed ({self.failed[:300]}); scoring runs eagerly")
            return None
        # Every tensor the recording reads must outlive it: `index` too, or its memory is reused and the replay
        # gathers with whatever lands there.
        entry = (graph, ids, last, out, index)
        self.graphs[key] = entry
        return entry

    def _record(self, forward: Any) -> tuple[Any, torch.Tensor]:
        """(graph, its output tensor): replaying the graph recomputes the output in place."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up outside the recording (kernel selection, workspace allocation)
                forward()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = forward()
        return graph, out

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor, lens: torch.Tensor) -> torch.Tensor | None:
        """Hidden states [rows, hidden] at position lens-1 of each right-padded row, or None (run eagerly)."""
        if self.failed:
            return None
        rows, tokens = ids.shape
        key = bucket(rows, tokens, self.max_tokens)
        if key is None:
            return None
        with self.lock:
            entry = self.graphs.get(key) or self._capture(key)
            if entry is None:
                return None
            graph, s_ids, s_last, out, _ = entry
            s_ids.fill_(self.pad_id)
            s_ids[:rows, :tokens].copy_(ids)
            s_last.zero_()
            s_last[:rows].copy_(lens - 1)
            graph.replay()
            self.replays += 1
            return out[:rows].clone()


def enable_cuda_graphs(model: Any, pad_id: int, log: Any = print) -> bool:
    """Attach recorded scoring forwards to a CUDA model (used by `scoring.letter_logits`); False elsewhere."""
    parts = fast_path_parts(model)
    try:
        device = next(model.parameters()).device
    except StopIteration:
        return False
    if parts is None or device.type != "cuda":
        return False
    graphed = GraphedDecoder(parts[0], pad_id, device, log)
    if not graphed.capture_all():
        return False
    model._qa_cuda_graphs = graphed
    return True
