"""Preflight: what hardware is here, how much GPU memory the job needs per component, and whether it fits.

Runs in well under a second and never imports torch: the hardware comes from /dev, sysfs and the vendor tools,
the model's shape from its config.json (local directory or Hugging Face cache) or a built-in table.
`runner run` calls `gate()` and refuses (exit 3) a job that cannot fit or uses a combination known to be broken.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runner.backends.base import EnvironmentProblem

if TYPE_CHECKING:
    from runner.plan import Plan
    from runner.spec import Job

GiB = 1024**3
# Device memory per GPU as the vendor tools report it (rocm-smi / nvidia-smi), in GiB.
GPU_MEMORY_GIB = {"mi300x": 191.5, "mi250x": 64.0, "h100": 79.6, "h200": 140.4, "a100": 79.2}
GPU_VENDOR = {"mi300x": "amd", "mi250x": "amd", "h100": "nvidia", "h200": "nvidia", "a100": "nvidia"}
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
# Runtime context (HIP/CUDA, kernels, communicator buffers) outside the allocator, and allocator slack.
RUNTIME_BYTES = 1.0 * GiB
ALLOCATOR_SLACK = 0.05
# Loss on full logits: bf16 logits, fp32 log-probabilities and their gradient live together in its backward.
LOGIT_BYTES = 12
RUNTIME = "runtime + allocator"


# --- hardware -----------------------------------------------------------------------------------------


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


# --- model shapes -------------------------------------------------------------------------------------


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
    from runner.paths import runner_home

    cache = Path(os.environ.get("RUNNER_CACHE") or runner_home() / "cache")
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


# --- memory model -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setup:
    """What sizes the memory: per-GPU micro-batch, precision, adapter, sharding."""

    dtype: str  # bf16 | fp16 | fp32
    tokens: int  # tokens per micro-batch on one GPU (batch_size x max_seq_len)
    gradient_checkpointing: bool
    lora_r: int
    lora_targets: tuple[str, ...]
    lora_dropout: float
    gpus: int  # data-parallel ranks the base model is sharded over (FSDP FULL_SHARD when > 1)
    quant_bits: int = 16  # 4 or 8 for bitsandbytes weights
    training: bool = True


@dataclass
class Component:
    name: str
    bytes: float
    note: str


def lora_params(arch: Arch, s: Setup) -> int:
    shapes = arch.linear_shapes()
    return arch.layers * sum(s.lora_r * (i + o) * n for t, (i, o, n) in shapes.items() if t in s.lora_targets)


def estimate(arch: Arch, s: Setup) -> list[Component]:
    """Peak memory per GPU, by component, for LoRA training (or inference when s.training is False).

    Activations per token and layer (bf16): the norms keep their fp32 input, PEFT keeps an fp32 copy of each
    adapted layer's input, attention keeps q/k/v/out, the MLP keeps gate, up, act(gate) and their product:
    about 40*hidden + 10*intermediate + 4*kv_width bytes. Gradient checkpointing keeps each layer's bf16 input
    and recomputes one layer at a time. The loss keeps bf16 logits, fp32 log-probabilities and their gradient:
    12 bytes per vocabulary entry per token. Checked against measured peaks (docs/containers.md).
    """
    b = DTYPE_BYTES[s.dtype]
    scale = b / 2 if b > 2 else 1.0
    n = max(1, s.gpus)
    shard = n if n > 1 else 1
    P = arch.params()
    out: list[Component] = []
    if s.quant_bits < 16:
        linear = arch.layers * (arch.layer_params() - 2 * arch.hidden)
        wbytes = linear * (s.quant_bits / 8 + 4 / 64) + (P - linear) * 2
        out.append(Component(f"weights ({s.quant_bits}-bit)", wbytes / shard,
                             f"{P / 1e9:.2f} B params, linear layers at {s.quant_bits} bits"))
    else:
        note = f"{P / 1e9:.2f} B params x {b} bytes = {P * b / 1e9:.1f} GB" + (
            f" / {shard} GPUs (FSDP)" if shard > 1 else "")
        out.append(Component(f"weights ({s.dtype})", P * b / shard, note))
    if shard > 1:  # FSDP gathers a layer (and prefetches the next) in full
        out.append(Component("gathered layers (FSDP)", 2 * arch.layer_params() * b, "2 layers unsharded"))
    h, L, kvd = arch.hidden, arch.layers, arch.kv_heads * arch.hd
    inter = arch.active_intermediate()
    T = s.tokens
    if s.training:
        lp = lora_params(arch, s)
        out.append(Component("LoRA params+grads+AdamW", lp * 16 / shard,
                             f"{lp / 1e6:.1f} M params x (4+4+8) bytes, fp32"))
        per_layer = (40 * h + 10 * inter + 4 * kvd) * scale
        if arch.experts:
            per_layer += 4 * arch.experts  # router probabilities
        if s.lora_dropout > 0:
            per_layer += 6 * h + inter  # dropout masks
        logits = T * arch.vocab * LOGIT_BYTES * scale
        if s.gradient_checkpointing:
            # The loss backward and the recomputation of one layer happen at different times: the peak is
            # the stored layer inputs plus the larger of the two.
            out.append(Component("activations (checkpointed)", T * L * h * b,
                                 f"{T} tokens x {L} layer inputs x {h * b} bytes"))
            layer = T * per_layer
            if layer > logits:
                out.append(Component("one layer recomputed", layer,
                                     f"{T} tokens x {per_layer / 1024:.0f} KiB (more than the loss: "
                                     f"{logits / GiB:.1f} GiB)"))
            else:
                out.append(Component("logits + loss", logits,
                                     f"{T} tokens x {arch.vocab} vocab x {LOGIT_BYTES} bytes (more than one "
                                     f"recomputed layer: {layer / GiB:.1f} GiB)"))
        else:
            out.append(Component("activations", T * L * per_layer,
                                 f"{T} tokens x {L} layers x {per_layer / 1024:.0f} KiB"))
            out.append(Component("logits + loss", logits, f"{T} tokens x {arch.vocab} vocab x {LOGIT_BYTES} bytes"))
    else:
        out.append(Component("activations (inference)", T * (4 * h + 2 * inter) * b, f"{T} tokens, one layer live"))
        out.append(Component("logits", T * arch.vocab * 6, f"{T} tokens x {arch.vocab} vocab"))
    sub = sum(c.bytes for c in out)
    out.append(Component(RUNTIME, RUNTIME_BYTES + ALLOCATOR_SLACK * sub,
                         f"{RUNTIME_BYTES / GiB:.0f} GiB context + {ALLOCATOR_SLACK:.0%} fragmentation"))
    return out


def total(components: list[Component]) -> float:
    return sum(c.bytes for c in components)


def allocated(components: list[Component]) -> float:
    """What PyTorch's allocator would report as peak (torch.cuda.max_memory_allocated): all but the runtime."""
    return sum(c.bytes for c in components if c.name != RUNTIME)


# --- the report ---------------------------------------------------------------------------------------


@dataclass
class Report:
    job: str
    kind: str
    hardware: Hardware
    arch: Arch | None = None
    setup: Setup | None = None
    components: list[Component] = field(default_factory=list)
    capacity_bytes: float | None = None
    capacity_label: str = ""
    errors: list[str] = field(default_factory=list)  # known-broken combinations
    warnings: list[str] = field(default_factory=list)
    suggestions: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> float:
        return total(self.components)

    @property
    def fits(self) -> bool | None:
        """True/False when the memory verdict is known, None when there is nothing to compare against."""
        if not self.components or self.capacity_bytes is None:
            return None
        return self.total_bytes <= self.capacity_bytes

    @property
    def ok(self) -> bool:
        return not self.errors and self.fits is not False

    def verdict(self) -> str:
        if self.fits is None:
            head = "CANNOT TELL" if self.components else "NOTHING TO ESTIMATE"
        elif self.fits:
            head = f"FITS on {self.capacity_label} ({((self.capacity_bytes or 0) - self.total_bytes) / GiB:.1f} GiB spare)"
        else:
            w = self.components[0].bytes
            per = " per GPU" if self.setup is not None and self.setup.gpus > 0 and "CPU" not in self.capacity_label else ""
            head = (f"DOES NOT FIT: needs {self.total_bytes / GiB:.1f} GiB{per}, {self.capacity_label} has "
                    f"{(self.capacity_bytes or 0) / GiB:.1f} GiB (the {self.components[0].name} alone take "
                    f"{w / GiB:.1f} GiB)")
        if self.errors:
            head += f"; {len(self.errors)} known-broken setting(s)"
        return head

    def render(self) -> str:
        lines = [f"preflight: {self.job} ({self.kind})", f"hardware here: {self.hardware.summary()}"]
        lines += [f"  note: {n}" for n in self.hardware.notes]
        if self.arch is not None:
            a = self.arch
            moe = f", {a.experts} experts ({a.experts_per_tok} per token)" if a.experts else ""
            lines.append(f"model: {a.name} from {a.source}: {a.params() / 1e9:.2f} B params, {a.layers} layers, "
                         f"hidden {a.hidden}, vocab {a.vocab}{moe}")
        if self.setup is not None:
            s = self.setup
            lines.append(
                f"setup: {self.capacity_label or 'unknown device'}, {s.dtype}"
                + (f", LoRA r={s.lora_r} on {len(s.lora_targets)} module kinds" if s.training else ", inference")
                + f", {s.tokens} tokens per micro-batch per GPU, gradient checkpointing "
                + ("on" if s.gradient_checkpointing else "off")
            )
        if self.components:
            lines.append("")
            lines.append(f"  {'component':<28} {'GiB':>9}  how")
            for c in self.components:
                lines.append(f"  {c.name:<28} {c.bytes / GiB:>9.1f}  {c.note}")
            cap = f" of {self.capacity_bytes / GiB:.1f} GiB" if self.capacity_bytes else ""
            lines.append(f"  {'total per GPU':<28} {self.total_bytes / GiB:>9.1f}{cap}")
            lines.append("")
        lines.append(f"verdict: {self.verdict()}")
        lines += [f"error: {e}" for e in self.errors]
        lines += [f"warning: {w}" for w in self.warnings]
        if self.suggestions:
            lines.append("what would fit:")
            lines += [f"  - {s}" for s in self.suggestions]
        return "\n".join(lines)


def _flavour(spec: Any) -> str:
    image = str(getattr(spec, "image", "cpu"))
    return image if image in ("rocm", "cuda", "cpu") else "cpu"


def _quant_bits(model: Any) -> int:
    q = str(getattr(model, "quantization", "") or "").lower()
    if getattr(model, "load_in_4bit", False) or "4" in q:
        return 4
    if getattr(model, "load_in_8bit", False) or "8" in q:
        return 8
    return 16


def _image_packages(flavour: str) -> list[str]:
    try:
        from runner.images import load_image_def

        return [p.lower() for p in load_image_def(flavour).packages]
    except Exception:
        return []


def known_broken(spec: Any, flavour: str, gpu_vendor: str | None) -> list[str]:
    """Combinations that cannot work, with the reason, found before anything is launched."""
    errors: list[str] = []
    model = getattr(spec, "model", None)
    amd = flavour == "rocm" or gpu_vendor == "amd"
    if model is not None and amd:
        if _quant_bits(model) < 16:
            errors.append(
                f"model {model.base}: {_quant_bits(model)}-bit bitsandbytes weights on ROCm 6.2: bitsandbytes "
                "publishes no ROCm 6.2 build (its CUDA kernels fail to load on AMD GPUs); use bf16 weights, "
                "more GPUs, or a smaller model"
            )
        pkgs = _image_packages("rocm")
        if str(getattr(model, "attn_implementation", "")) == "flash_attention_2" and not any(
            p.startswith("flash") for p in pkgs
        ):
            errors.append(
                "model.attn_implementation=flash_attention_2 on ROCm: flash-attn has no prebuilt ROCm 6.2 wheel and "
                "the rocm image does not build AMD's fork; use `sdpa` (PyTorch's SDPA uses AMD's flash kernels "
                "on MI300X)"
            )
        if any(p.startswith("bitsandbytes") for p in pkgs):
            errors.append("images/rocm.yaml installs bitsandbytes, which has no ROCm 6.2 build; remove it")
    res = getattr(spec, "resources", None)
    gpu_type = str(getattr(res, "gpu_type", "auto"))
    if flavour in ("rocm", "cuda") and gpu_type in GPU_VENDOR:
        want = "amd" if flavour == "rocm" else "nvidia"
        if GPU_VENDOR[gpu_type] != want:
            errors.append(f"image {flavour} cannot drive a {gpu_type} (resources.gpu_type); use image "
                          f"{'rocm' if GPU_VENDOR[gpu_type] == 'amd' else 'cuda'}")
    return errors


def _setup_for(spec: Any, gpus: int) -> Setup:
    model, train = spec.model, getattr(spec, "train", None)
    dtype = str(model.dtype)
    if dtype == "auto":
        dtype = "bf16" if gpus > 0 else "fp32"
    lora = getattr(spec, "lora", None)
    batch = int(getattr(train, "batch_size", 0) or getattr(spec, "batch_size", 8) or 8)
    seq = int(getattr(train, "max_seq_len", 0) or getattr(spec, "max_seq_len", 512) or 512)
    return Setup(
        dtype=dtype, tokens=batch * seq, gradient_checkpointing=bool(model.gradient_checkpointing),
        lora_r=int(getattr(lora, "r", 16)), lora_targets=tuple(getattr(lora, "target_modules", ()) or ()),
        lora_dropout=float(getattr(lora, "dropout", 0.0)), gpus=max(1, gpus), quant_bits=_quant_bits(model),
        training=train is not None,
    )


def _fits(arch: Arch, s: Setup, cap: float) -> bool:
    return total(estimate(arch, s)) <= cap


def suggest(arch: Arch, s: Setup, cap: float, gpu_label: str, max_gpus: int = 64) -> list[str]:
    """Changes that would make the job fit, each with its resulting total."""
    out: list[str] = []

    def t(x: Setup) -> str:
        return f"{total(estimate(arch, x)) / GiB:.1f} GiB per GPU"

    if s.training and not s.gradient_checkpointing:
        gc = replace(s, gradient_checkpointing=True)
        if _fits(arch, gc, cap):
            out.append(f"model.gradient_checkpointing: true ({t(gc)})")
    s2 = s if _fits(arch, replace(s, tokens=1), cap) or s.gradient_checkpointing else replace(
        s, gradient_checkpointing=True)
    if _fits(arch, replace(s2, tokens=256), cap):
        lo, hi = 256, s2.tokens
        while hi - lo > 64:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if _fits(arch, replace(s2, tokens=mid), cap) else (lo, mid)
        if lo < s.tokens:
            extra = "" if s2 is s else " with gradient checkpointing"
            out.append(f"at most ~{lo} tokens per micro-batch{extra} (train.batch_size x train.max_seq_len; raise "
                       f"train.grad_accum to keep the tokens per step) ({t(replace(s2, tokens=lo))})")
    for n in range(max(2, s.gpus + 1), max_gpus + 1):
        m = replace(s2, gpus=n)
        if _fits(arch, m, cap):
            out.append(f"resources.gpus: {n} x {gpu_label} with the base sharded by FSDP ({t(m)})")
            break
    else:
        if max_gpus > 1:
            out.append(f"not even {max_gpus} x {gpu_label} at this micro-batch")
    family = re.sub(r"-[\d.]+b.*$", "", arch.name.lower())
    smaller = sorted((a for a in KNOWN.values() if a.name.lower().startswith(family) and a.params() < arch.params()),
                     key=lambda a: -a.params())
    for a in smaller:
        if _fits(a, s, cap):
            out.append(f"a smaller model: {a.name} ({a.params() / 1e9:.1f} B, {total(estimate(a, s)) / GiB:.1f} GiB "
                       f"per GPU as configured)")
            break
    return out


def preflight(job: Job, plan: Plan | None = None, hardware: Hardware | None = None) -> Report:
    """Estimate the job's memory on the GPUs it asks for (or finds) and say whether it fits."""
    spec: Any = job.spec
    hw = hardware if hardware is not None else probe_hardware(docker=plan is None or plan.backend == "docker")
    rep = Report(job=job.name, kind=job.kind, hardware=hw)
    model = getattr(spec, "model", None)
    res = getattr(spec, "resources", None)
    flavour = _flavour(spec)
    gpus = int(getattr(res, "gpus", 0) or 0)
    gpu_type = str(getattr(res, "gpu_type", "auto"))
    if gpus > 0:
        gpu_memory_gb = getattr(res, "gpu_memory_gb", None)
        if gpu_memory_gb:
            rep.capacity_bytes = float(gpu_memory_gb) * GiB
            rep.capacity_label = f"{gpus} x {gpu_type if gpu_type != 'auto' else 'GPU'}"
        elif gpu_type in GPU_MEMORY_GIB:
            rep.capacity_bytes = GPU_MEMORY_GIB[gpu_type] * GiB
            rep.capacity_label = f"{gpus} x {gpu_type}"
        elif hw.gpus:
            rep.capacity_bytes = float(min(g.memory_bytes for g in hw.gpus))
            rep.capacity_label = f"{gpus} x {hw.gpus[0].name}"
        else:
            rep.warnings.append("resources.gpu_type is auto and no GPU is found here: set resources.gpu_type "
                                "(mi300x, h100, ...) or gpu_memory_gb to get a verdict")
        if len(hw.gpus) < gpus * int(getattr(res, "nodes", 1) or 1) and int(getattr(res, "nodes", 1) or 1) == 1:
            rep.warnings.append(f"the job asks for {gpus} GPU(s); this machine has {len(hw.gpus)}: the estimate is "
                                f"for the machine it is sized for")
    else:
        rep.capacity_bytes = float(hw.host_memory_bytes) or None
        rep.capacity_label = "CPU (host memory available)"
    gpu_vendor = GPU_VENDOR.get(gpu_type) or (hw.gpus[0].vendor if hw.gpus else None)
    rep.errors += known_broken(spec, flavour, gpu_vendor if gpus > 0 else None)
    if model is None:
        return rep
    arch = model_arch(model, plan.workdir if plan is not None else ".")
    if arch is None:
        rep.warnings.append(f"the shape of {model.base} is unknown (no config.json locally or in the Hugging Face "
                            f"cache, not in the built-in table): set model.params_b to get an estimate")
        return rep
    rep.arch = arch
    rep.setup = _setup_for(spec, gpus)
    rep.components = estimate(arch, rep.setup)
    if rep.fits is False and rep.capacity_bytes:
        label = gpu_type if gpu_type != "auto" else "GPU"
        rep.suggestions = suggest(arch, rep.setup, rep.capacity_bytes, label, max_gpus=64 if gpus > 0 else 0)
    return rep


def preflight_main(job: Job, plan: Plan | None = None) -> int:
    """`runner preflight FILE`: print the report; exit 0 when it fits, 3 when it cannot run as configured."""
    rep = preflight(job, plan)
    print(rep.render())
    return 0 if rep.ok else 3


def gate(job: Job, plan: Plan, force: bool = False) -> Report | None:
    """Before `runner run`: raise EnvironmentProblem (exit 3) when the job cannot fit or is known broken."""
    if force or os.environ.get("RUNNER_FORCE") == "1":
        return None
    rep = preflight(job, plan, hardware=probe_hardware(docker=False))
    if rep.ok:
        return rep
    why = rep.errors + ([rep.verdict()] if rep.fits is False else [])
    fix = ("; what would fit: " + "; ".join(rep.suggestions)) if rep.suggestions else ""
    raise EnvironmentProblem(
        "preflight: " + " | ".join(why) + fix + f" (details: runner preflight {job.source}; --force runs it anyway)"
    )
