"""Preflight: what hardware is here, how much GPU memory the job needs per component, and whether it fits.

Runs in well under a second and never imports torch: the hardware comes from /dev, sysfs and the vendor tools,
the model's shape from its config.json (local directory or Hugging Face cache) or a built-in table.
`runner run` calls `gate()` and refuses (exit 3) a job that cannot fit or uses a combination known to be broken.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from runner.backends.base import EnvironmentProblem

if TYPE_CHECKING:
    from runner.plan import Plan
    from runner.spec import Job
from runner.preflight.memory import Component, GiB, Setup, estimate, params_text, suggest, total
from runner.preflight.probe import GPU_MEMORY_GIB, GPU_VENDOR, Hardware, probe_hardware
from runner.preflight.shapes import Arch, model_arch

# --- hardware -----------------------------------------------------------------------------------------


# --- model shapes -------------------------------------------------------------------------------------


# --- memory model -------------------------------------------------------------------------------------


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
            lines.append(f"model: {a.name} from {a.source}: {params_text(a.params())} params, {a.layers} layers, "
                         f"hidden {a.hidden}, vocab {a.vocab}{moe}")
        if self.setup is not None:
            s = self.setup
            lines.append(
                f"setup: {self.capacity_label or 'unknown device'}, {s.dtype}"
                + (f", LoRA r={s.lora_r} on {len(s.lora_targets)} module kinds" if s.training else ", inference")
                + f", {s.tokens} tokens per micro-batch" + ("" if s.cpu else " per GPU")
                + (f", layout {s.layout}" if s.training else "") + ", gradient checkpointing "
                + ("on" if s.gradient_checkpointing else "off")
            )
        if self.components:
            lines.append("")
            lines.append(f"  {'component':<28} {'GiB':>9}  how")
            digits = 2 if self.setup is not None and self.setup.cpu else 1
            for c in self.components:
                lines.append(f"  {c.name:<28} {c.bytes / GiB:>9.{digits}f}  {c.note}")
            cap = f" of {self.capacity_bytes / GiB:.1f} GiB" if self.capacity_bytes else ""
            label = "total (process RSS)" if self.setup is not None and self.setup.cpu else "total per GPU"
            lines.append(f"  {label:<28} {self.total_bytes / GiB:>9.{digits}f}{cap}")
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
        training=train is not None, device="gpu" if gpus > 0 else "cpu", layout=_layout(train, gpus), row_len=seq,
        fused_lora=bool(getattr(train, "fused_lora", True)), compile=bool(getattr(train, "compile", False)),
    )


def _layout(train: Any, gpus: int) -> str:
    """train.layout as the trainer resolves it (`resolve_layout`): auto is varlen on a GPU, grouped on a CPU,
    padded without packing."""
    layout = str(getattr(train, "layout", "auto"))
    if layout != "auto":
        return layout
    if not bool(getattr(train, "packing", True)):
        return "padded"
    return "varlen" if gpus > 0 else "grouped"


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
