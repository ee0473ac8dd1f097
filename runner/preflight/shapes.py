"""Model shapes: a built-in table of the common bases and the config.json of a local directory or HF cache entry."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    pass


@dataclass(frozen=True)
class Arch:
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool
    head_dim: int = 0  # 0: hidden // heads
    qkv_bias: bool = False
    qk_norm: bool = False
    experts: int = 0
    experts_per_tok: int = 0
    moe_intermediate: int = 0
    source: str = "built-in table"
    params_override: int = 0  # a stated parameter count (model.params_b) wins over the shape's


    @property
    def hd(self) -> int:
        return self.head_dim or self.hidden // self.heads

    def layer_params(self) -> int:
        h, hd = self.hidden, self.hd
        attn = h * self.heads * hd + 2 * h * self.kv_heads * hd + self.heads * hd * h
        if self.qkv_bias:
            attn += self.heads * hd + 2 * self.kv_heads * hd
        if self.qk_norm:
            attn += 2 * hd
        if self.experts:
            mlp = self.experts * 3 * h * self.moe_intermediate + h * self.experts
        else:
            mlp = 3 * h * self.intermediate
        return attn + mlp + 2 * h

    def embedding_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2)

    def params(self) -> int:
        if self.params_override:
            return self.params_override
        return self.layers * self.layer_params() + self.embedding_params() + self.hidden

    def active_intermediate(self) -> int:
        """Width of the MLP a token goes through (its experts' together for a mixture of experts)."""
        return self.experts_per_tok * self.moe_intermediate if self.experts else self.intermediate

    def linear_shapes(self) -> dict[str, tuple[int, int, int]]:
        """(in, out, copies per layer) of each adaptable linear layer."""
        h, hd, i = self.hidden, self.hd, (self.moe_intermediate if self.experts else self.intermediate)
        n = self.experts or 1
        return {
            "q_proj": (h, self.heads * hd, 1), "k_proj": (h, self.kv_heads * hd, 1),
            "v_proj": (h, self.kv_heads * hd, 1), "o_proj": (self.heads * hd, h, 1),
            "gate_proj": (h, i, n), "up_proj": (h, i, n), "down_proj": (i, h, n),
        }


def _q25(name: str, h: int, L: int, heads: int, kv: int, inter: int, vocab: int, tied: bool) -> Arch:
    return Arch(name, h, L, heads, kv, inter, vocab, tied, qkv_bias=True)


def _q3(name: str, h: int, L: int, heads: int, kv: int, inter: int, tied: bool, **moe: int) -> Arch:
    return Arch(name, h, L, heads, kv, inter, 151936, tied, head_dim=128, qk_norm=True, **moe)  # type: ignore[arg-type]


def _llama(name: str, h: int, L: int, heads: int, kv: int, inter: int, tied: bool) -> Arch:
    return Arch(name, h, L, heads, kv, inter, 128256, tied)


# Shapes from the models' published config.json files.
KNOWN: dict[str, Arch] = {a.name.lower(): a for a in [
    _q25("Qwen2.5-0.5B", 896, 24, 14, 2, 4864, 151936, True),
    _q25("Qwen2.5-1.5B", 1536, 28, 12, 2, 8960, 151936, True),
    _q25("Qwen2.5-3B", 2048, 36, 16, 2, 11008, 151936, True),
    _q25("Qwen2.5-7B", 3584, 28, 28, 4, 18944, 152064, False),
    _q25("Qwen2.5-14B", 5120, 48, 40, 8, 13824, 152064, False),
    _q25("Qwen2.5-32B", 5120, 64, 40, 8, 27648, 152064, False),
    _q25("Qwen2.5-72B", 8192, 80, 64, 8, 29568, 152064, False),
    _q3("Qwen3-0.6B", 1024, 28, 16, 8, 3072, True),
    _q3("Qwen3-1.7B", 2048, 28, 16, 8, 6144, True),
    _q3("Qwen3-4B", 2560, 36, 32, 8, 9728, True),
    _q3("Qwen3-8B", 4096, 36, 32, 8, 12288, False),
    _q3("Qwen3-14B", 5120, 40, 40, 8, 17408, False),
    _q3("Qwen3-32B", 5120, 64, 64, 8, 25600, False),
    _q3("Qwen3-30B-A3B", 2048, 48, 32, 4, 6144, False, experts=128, experts_per_tok=8, moe_intermediate=768),
    _q3("Qwen3-235B-A22B", 4096, 94, 64, 4, 12288, False, experts=128, experts_per_tok=8, moe_intermediate=1536),
    _llama("Llama-3.2-1B", 2048, 16, 32, 8, 8192, True),
    _llama("Llama-3.2-3B", 3072, 28, 24, 8, 8192, True),
    _llama("Llama-3.1-8B", 4096, 32, 32, 8, 14336, False),
    _llama("Llama-3.1-70B", 8192, 80, 64, 8, 28672, False),
    _llama("Llama-3.1-405B", 16384, 126, 128, 8, 53248, False),
    Arch("SmolLM2-135M", 576, 30, 9, 3, 1536, 49152, True),  # also the offline `smollm2-135m` base
]}


ALIASES = {"llama-3-8b": "llama-3.1-8b", "llama-3-70b": "llama-3.1-70b", "llama-3.3-70b": "llama-3.1-70b"}


def known_key(base: str) -> str:
    """`Qwen/Qwen2.5-72B-Instruct` -> `qwen2.5-72b`; `meta-llama/Meta-Llama-3.1-8B-Instruct` -> `llama-3.1-8b`."""
    name = base.rstrip("/").split("/")[-1].lower()
    name = re.sub(r"^meta-", "", name)
    while True:
        new = re.sub(r"-(instruct|chat|base|it|hf|fp8|\d{4})$", "", name)
        if new == name:
            break
        name = new
    return ALIASES.get(name, name)


def _from_config(cfg: dict[str, Any], source: str) -> Arch:
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else None
    c = text or cfg
    mt = str(c.get("model_type", ""))
    heads = int(c["num_attention_heads"])
    return Arch(
        name=str(cfg.get("_name_or_path") or mt or "model"),
        hidden=int(c["hidden_size"]), layers=int(c["num_hidden_layers"]), heads=heads,
        kv_heads=int(c.get("num_key_value_heads") or heads), intermediate=int(c.get("intermediate_size") or 0),
        vocab=int(c["vocab_size"]), tied=bool(c.get("tie_word_embeddings", False)),
        head_dim=int(c.get("head_dim") or 0), qkv_bias=mt == "qwen2" or bool(c.get("attention_bias", False)),
        qk_norm=mt.startswith("qwen3"), experts=int(c.get("num_experts") or c.get("n_routed_experts") or 0),
        experts_per_tok=int(c.get("num_experts_per_tok") or 0),
        moe_intermediate=int(c.get("moe_intermediate_size") or 0), source=source,
    )


def _hf_cache_dirs() -> list[Path]:
    dirs = []
    for env in ("HF_HUB_CACHE",):
        if os.environ.get(env):
            dirs.append(Path(os.environ[env]))
    if os.environ.get("HF_HOME"):
        dirs.append(Path(os.environ["HF_HOME"]) / "hub")
    from runner.paths import runner_cache

    cache = runner_cache()
    dirs += [cache / "hf" / "hub", Path.home() / ".cache" / "huggingface" / "hub"]
    return dirs


def find_config(base: str, workdir: str = ".") -> Path | None:
    local = Path(workdir) / base
    if (local / "config.json").is_file():
        return local / "config.json"
    if "/" in base and not base.startswith((".", "/")):
        repo = "models--" + base.replace("/", "--")
        for d in _hf_cache_dirs():
            snaps = sorted((d / repo / "snapshots").glob("*/config.json"))
            if snaps:
                return snaps[-1]
    return None


def model_arch(model: Any, workdir: str = ".") -> Arch | None:
    """The shape of `model` (a ModelSpec): tiny, a local/cached config.json, the built-in table, or params_b."""
    base = str(model.base)
    if base == "tiny":
        t = model.tiny
        return Arch("tiny", t.hidden_size, t.layers, t.heads, t.heads // 2 if t.heads % 2 == 0 else t.heads,
                    t.hidden_size * 4, 4096, True, source="the offline tiny model")
    cfg = find_config(base, workdir)
    if cfg is not None:
        try:
            return _from_config(json.loads(cfg.read_text()), f"config.json at {cfg}")
        except (OSError, ValueError, KeyError, TypeError):
            pass
    known = KNOWN.get(known_key(base))
    if known is not None:
        return known
    if model.params_b:
        # A dense decoder of that size: hidden ~ layers * 100 and 12 * layers * hidden^2 parameters.
        p = model.params_b * 1e9
        h = int(round((100 * p / 12) ** (1 / 3) / 128) * 128) or 128
        L = max(1, round(p / (12 * h * h)))
        return Arch(f"{model.params_b:g}B (model.params_b)", h, L, max(1, h // 128), max(1, h // 1024), 4 * h,
                    152064, False, source="model.params_b (shape approximated)", params_override=int(p))
    return None
