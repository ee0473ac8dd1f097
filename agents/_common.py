"""Shared command-line plumbing of the two agent commands."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any


def add_model_args(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("model (default: $RUNNER_ARTIFACT when set, else --model tiny)")
    g.add_argument("--registry", default=os.environ.get("RUNNER_ARTIFACT"),
                   help="promoted artifact: NAME@alias, NAME:vN or a version directory")
    g.add_argument("--model", default="tiny", help="base model: tiny, a local directory or a Hub id")
    g.add_argument("--adapter", help="LoRA adapter, checkpoint or run directory on top of --model")
    g.add_argument("--device", default="auto", help="torch device (auto: a GPU when there is one)")


def load_model(args: argparse.Namespace) -> tuple[Any, Any, str]:
    from runner.spec.models import ModelSpec
    from runner.spec.serve import AgentSource
    from runner.workloads.agents.sources import load_source, pick_device

    registry = args.registry
    if registry and Path(registry).is_dir():
        registry = str(Path(registry).resolve())
    src = AgentSource(model=ModelSpec(base=args.model), adapter=args.adapter, registry=registry or None)
    return load_source(src, pick_device(args.device), log=lambda m: print(m, file=sys.stderr))


def write_json(path: str, data: Any) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    os.replace(tmp, p)


def fail(message: str, code: int = 2) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code
