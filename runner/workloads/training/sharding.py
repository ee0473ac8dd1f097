"""`resources.strategy: fsdp` on CPU ranks: FSDP2 (`torch.distributed.fsdp.fully_shard`) of every decoder layer
over the gloo ranks, applied by the trainer itself (accelerate shards only GPU ranks).

What is sharded: each decoder layer is one FSDP unit, so its weights, its LoRA adapters, their gradients and the
optimizer state of those adapters live 1/world on each rank (dim 0, `torch.chunk` order), and a layer is gathered
in full only while it runs. The embeddings, the final norm and the head stay whole on every rank: they are frozen
(no gradient, no optimizer state), and a tied head shares the embedding's weight, which FSDP needs in one unit.
A LoRA target outside the decoder layers is refused, since its update would not be synchronised.

Checkpoints keep the trainer's format: the adapter is gathered to full tensors (every rank takes part, rank 0
writes it as PEFT does), and each rank writes its own optimizer shard as plain tensors (`optimizer.rankN.pt`),
which a resume with the same world size wraps back into its shards."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch


def shard_decoder_layers(model: Any, world: int, log: Callable[[str], None]) -> list[Any]:
    """fully_shard each decoder layer of `model` over a CPU mesh of `world` ranks; returns the layers.
    Raises ValueError when the model has no decoder layers or trains a parameter outside them."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from runner.workloads.model.packed_attention import decoder_layers

    layers = decoder_layers(model)
    if not layers:
        raise ValueError("resources.strategy fsdp on CPU ranks shards the decoder layers, and this model has none "
                         "the trainer can find; use strategy ddp")
    mesh = init_device_mesh("cpu", (world,))
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    inside = {id(p) for layer in layers for p in layer.parameters()}
    outside = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in inside]
    if outside:
        raise ValueError(f"resources.strategy fsdp on CPU ranks shards the decoder layers, but {outside[0]} (and "
                         f"{len(outside) - 1} more) is trained outside them; keep lora.target_modules inside the "
                         "decoder layers or use strategy ddp")
    log(f"strategy fsdp: {len(layers)} decoder layers sharded over {world} CPU ranks (FSDP2 fully_shard); "
        "embeddings and head whole on every rank (frozen)")
    return list(layers)


def even_micro_batches(micro: list[Any], acc: Any) -> tuple[list[Any], list[float]]:
    """The micro-batches and their weights, with every rank's count made the same: each FSDP forward and backward
    is a collective (a layer's gather, its gradients' reduce-scatter), so a rank with fewer micro-batches repeats
    its last one at weight 0, which adds nothing to the gradient or the loss."""
    most = int(acc.reduce(torch.tensor([float(len(micro))]), reduction="max").item())
    extra = most - len(micro) if micro else 0
    return micro + [micro[-1]] * extra, [1.0] * len(micro) + [0.0] * extra


def is_sharded(t: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


@contextmanager
def no_gradient_sync(layers: list[Any], skip: bool) -> Iterator[None]:
    """With `skip`, the layers accumulate their gradients without the reduce-scatter (a micro-batch before the
    step's last); the last micro-batch reduces what all of them accumulated."""
    if not skip:
        yield
        return
    for layer in layers:
        layer.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.set_requires_gradient_sync(True)


def full_adapter_state(model: Any) -> dict[str, torch.Tensor]:
    """The LoRA weights of `model` as full tensors (names as in `model.state_dict()`). A collective: every rank
    calls it, in the same order."""
    out: dict[str, torch.Tensor] = {}
    for name, value in model.state_dict().items():
        if "lora_" in name:
            out[name] = (value.full_tensor() if is_sharded(value) else value).detach().cpu()
    return out


def load_full_adapter(model: Any, adapter: dict[str, torch.Tensor], adapter_name: str = "default") -> None:
    """Copy a saved PEFT adapter (full tensors, PEFT's file names) into this rank's shards of `model`."""
    params = dict(model.named_parameters())
    by_saved = {name.replace(f".{adapter_name}", ""): name for name in params if "lora_" in name}
    missing = sorted(set(by_saved) - set(adapter))
    if missing:
        raise ValueError(f"the adapter has no {missing[0]} (and {len(missing) - 1} more the model has)")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    with torch.no_grad():
        for saved, name in by_saved.items():
            p, full = params[name], adapter[saved]
            if not is_sharded(p):
                p.copy_(full)
                continue
            local = p.to_local()
            chunks = torch.chunk(full, world, dim=0)
            mine = chunks[rank] if rank < len(chunks) else full[:0]
            if tuple(mine.shape) != tuple(local.shape):
                raise ValueError(f"{saved}: shape {tuple(full.shape)} does not fit the model's shard "
                                 f"{tuple(local.shape)} of {tuple(p.shape)}")
            local.copy_(mine)


def local_optimizer_state(opt: Any) -> dict[str, Any]:
    """`opt.state_dict()` with each sharded tensor replaced by this rank's shard (a copy of the structure: the
    optimizer's own state is left as it is)."""
    sd = opt.state_dict()
    sd["state"] = {i: {k: (v.to_local() if is_sharded(v) else v) for k, v in st.items()}
                   for i, st in sd["state"].items()}
    return sd


def reshard_optimizer_state(opt: Any) -> None:
    """After `opt.load_state_dict` of a local state: wrap each plain per-parameter tensor of a sharded parameter
    back into a DTensor laid out as that parameter."""
    from torch.distributed.tensor import DTensor

    for p, st in opt.state.items():
        if not is_sharded(p):
            continue
        local_shape = tuple(p.to_local().shape)
        for k, v in list(st.items()):
            if torch.is_tensor(v) and not is_sharded(v) and tuple(v.shape) == local_shape and v.dim() > 0:
                st[k] = DTensor.from_local(v, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                           stride=p.stride())


def total_grad_norm(norm: Any) -> float:
    """The global gradient norm `clip_grad_norm_` returned, as a float (a DTensor under FSDP)."""
    return float(norm.full_tensor() if is_sharded(norm) else norm)
