"""The offline `tiny` base: its architecture (a small Qwen2), its identity (settings hash) and where it is cached.

Building it (tokenizer training and pretraining) is a recipe of its own, `recipes/pretrain_tiny.py`; this module
only knows how to make the untrained network and how to find a finished build under $RUNNER_CACHE/tiny/.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from runner.paths import runner_cache
from runner.spec.models import TinyModel

TINY_VERSION = "tiny-v2"  # bump when the tokenizer, architecture or pretraining recipe changes
TINY_VOCAB = 4096
# The pretraining settings are part of the tiny base's identity: a change builds a new cache entry.
PRETRAIN_BATCH = 64
PRETRAIN_LR = 3e-3
FACTS_PER_STEP = 32  # knowledge sentences per pretraining step, next to the 64 MCQs


def build_tiny_model(tiny: TinyModel, vocab_size: int, pad_id: int, attn: str = "sdpa") -> Any:
    from transformers import AutoModelForCausalLM, Qwen2Config

    kv = tiny.heads // 2 if tiny.heads % 2 == 0 else tiny.heads
    cfg = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=tiny.hidden_size,
        intermediate_size=tiny.hidden_size * 4,
        num_hidden_layers=tiny.layers,
        num_attention_heads=tiny.heads,
        num_key_value_heads=kv,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        pad_token_id=pad_id,
        eos_token_id=pad_id - 1,
        bos_token_id=None,
    )
    cfg._attn_implementation = attn
    torch.manual_seed(tiny.seed)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)


def tiny_settings_hash(tiny: TinyModel) -> str:
    d = {
        "version": TINY_VERSION,
        "vocab": TINY_VOCAB,
        "batch": PRETRAIN_BATCH,
        "facts": FACTS_PER_STEP,
        "lr": PRETRAIN_LR,
        **tiny.model_dump(),
    }
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def tiny_dir(tiny: TinyModel, cache_dir: Path | None = None) -> Path:
    """Where the tiny base with these settings lives; complete once `pretrain.json` exists (written last)."""
    return (cache_dir or runner_cache()) / "tiny" / tiny_settings_hash(tiny)


def is_built(path: Path) -> bool:
    return (path / "pretrain.json").exists()
