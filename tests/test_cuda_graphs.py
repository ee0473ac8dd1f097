"""The recorded-forward scorer's bookkeeping (buckets, static buffers, padding, fallbacks), checked on a CPU with
the recording step replaced by an eager stand-in; the CUDA recording itself runs only on a GPU (bench/gpu_all.sh)."""

from __future__ import annotations

from typing import Any

import _tiny_lm as tiny
import pytest
import torch

from runner.workloads.scoring import cuda_graphs
from runner.workloads.scoring.cuda_graphs import GraphedDecoder, bucket, enable_cuda_graphs, grid
from runner.workloads.scoring.scorer import fast_path_parts, score_mcq

torch.set_num_threads(1)


class _Replay:
    """Stands in for a CUDA graph: replay reruns the forward into the recorded output tensor."""

    def __init__(self, forward: Any, out: torch.Tensor) -> None:
        self.forward, self.out = forward, out

    def replay(self) -> None:
        self.out.copy_(self.forward())


def _eager_record(self: GraphedDecoder, forward: Any) -> tuple[Any, torch.Tensor]:
    out = forward()
    return _Replay(forward, out), out


def test_buckets_cover_small_batches_only():
    assert bucket(1, 10) == (1, 64) and bucket(3, 65) == (4, 128) and bucket(16, 128) == (16, 128)
    assert bucket(16, 129) is None  # 16 x 192 > MAX_TOKENS: compute-bound, runs eagerly
    assert bucket(33, 10) is None and bucket(1, 513) is None
    g = grid()
    assert (1, 512) in g and all(r * t <= cuda_graphs.MAX_TOKENS for r, t in g)
    assert len(g) == len(set(g))


def test_recorded_forward_scores_like_the_eager_one(monkeypatch):
    tok = tiny.tokenizer()
    model = tiny.model(seed=2)
    items = tiny.make_items(23, [2, 4, 5, 10], seed=3)
    eager = score_mcq(model, tok, items, batch_size=5)
    monkeypatch.setattr(GraphedDecoder, "_record", _eager_record)
    graphed = GraphedDecoder(fast_path_parts(model)[0], tok.pad_token_id, torch.device("cpu"), log=lambda m: None)
    assert graphed.capture_all() == len(grid())
    model._qa_cuda_graphs = graphed
    got = score_mcq(model, tok, items, batch_size=5)  # batches padded up to their bucket, rows and tokens
    torch.testing.assert_close(got, eager, atol=2e-5, rtol=1e-4)
    assert graphed.replays == 5
    # Replaying one bucket for a smaller batch than the last leaves no stale rows behind.
    torch.testing.assert_close(score_mcq(model, tok, items[:1], batch_size=5), eager[:1], atol=2e-5, rtol=1e-4)


def test_failed_recording_falls_back_to_eager(monkeypatch):
    tok = tiny.tokenizer()
    model = tiny.model(seed=2)
    items = tiny.make_items(6, 4, seed=4)
    eager = score_mcq(model, tok, items, batch_size=8)

    def broken(self: GraphedDecoder, forward: Any) -> tuple[Any, torch.Tensor]:
        raise RuntimeError("operation not permitted when stream is capturing")

    logs: list[str] = []
    monkeypatch.setattr(GraphedDecoder, "_record", broken)
    graphed = GraphedDecoder(fast_path_parts(model)[0], tok.pad_token_id, torch.device("cpu"), log=logs.append)
    assert graphed.capture_all() == 0 and "recording failed" in logs[0]
    model._qa_cuda_graphs = graphed
    torch.testing.assert_close(score_mcq(model, tok, items, batch_size=8), eager)


def test_not_enabled_off_a_gpu():
    model = tiny.model(seed=2)
    assert not enable_cuda_graphs(model, 0)
    assert not hasattr(model, "_qa_cuda_graphs")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_recording_matches_eager():
    tok = tiny.tokenizer()
    model = tiny.model(seed=2).cuda()
    items = tiny.make_items(23, [2, 4, 5, 10], seed=3)
    eager = score_mcq(model, tok, items, batch_size=5)
    assert enable_cuda_graphs(model, tok.pad_token_id)
    torch.testing.assert_close(score_mcq(model, tok, items, batch_size=5), eager, atol=1e-4, rtol=1e-3)
