"""The `vllm` engine: vLLM's OpenAI-compatible server as a child process on a loopback port.

The runner starts `vllm serve` (the argv of `runner.engine_commands.vllm_command`, shown by `runner plan`), waits
for its health endpoint, and asks `/v1/completions` for exactly the project's token ids: the letters with
`max_tokens: 1`, `allowed_token_ids` and logprobs after that restriction (the letter distribution), and
generations with the token ids returned. The server's output goes to a log file named at start; a server that dies
or does not come up is reported with the tail of that log.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import torch

from runner.engine_commands import BASE_NAME, LORA_NAME, shown, vllm_command, vllm_launcher
from runner.paths import PROJECT_ROOT
from runner.workloads.serving.engines.base import EngineError, EngineModel

REQUEST_TIMEOUT_S = 600.0  # one request's limit when the caller gives no deadline


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _platform(device: str) -> str:
    if device.startswith("cuda"):
        return "rocm" if getattr(torch.version, "hip", None) else "cuda"
    return "cpu"


def _lora_r(adapter_dir: str | None) -> int | None:
    if adapter_dir is None:
        return None
    try:
        return int(json.loads((Path(adapter_dir) / "adapter_config.json").read_text())["r"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


SHM_NEEDED = 1 << 30  # measured: the CPU server fails to start in Docker's default 64 MiB /dev/shm, starts in 2 GiB


def _shm_hint(path: str = "/dev/shm") -> str:
    """Why a server may not have started: a /dev/shm too small for vLLM's shared-memory queues (a container run
    without --shm-size); empty when it is large enough or absent."""
    try:
        st = os.statvfs(path)
    except OSError:
        return ""
    size = st.f_frsize * st.f_blocks
    if size >= SHM_NEEDED:
        return ""
    return (f" (/dev/shm is {size / 2**20:.0f} MiB and vLLM's engine uses shared memory: in a container, run it "
            "with --shm-size 2g)")


def _tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(text[-lines:])


class VllmModel(EngineModel):
    engine = "vllm"

    def __init__(self, proc: subprocess.Popen[bytes], url: str, served: str, log_path: Path, description: str,
                 eos_id: int | None) -> None:
        super().__init__(description)
        self.proc = proc
        self.url = url
        self.served = served
        self.log_path = log_path
        self.eos_id = eos_id
        self.client = httpx.Client(base_url=url, timeout=REQUEST_TIMEOUT_S)
        self._closed = False
        self._lock = threading.Lock()

    @classmethod
    def start(cls, spec: Any, model_dir: str, adapter_dir: str | None, tokenizer: Any, device: str,
              log: Any = print) -> VllmModel:
        port = _free_port()
        launcher = vllm_launcher(spec, PROJECT_ROOT, dict(os.environ))
        exe = launcher[0]
        if os.sep in exe and not Path(exe).is_file():
            raise EngineError(f"engine vllm: {exe} does not exist; install vLLM there (on CPU: bash "
                              ".ci/engines-up.sh makes .venv-vllm) or set vllm.python / $QA_VLLM_PYTHON")
        argv, extra = vllm_command(spec, model_dir, adapter_dir, port=port, platform=_platform(device),
                                   lora_r=_lora_r(adapter_dir), launcher=launcher)
        log_dir = Path(os.environ.get("QA_ENGINE_LOG_DIR") or tempfile.gettempdir())
        log_dir.mkdir(parents=True, exist_ok=True)
        log_path = log_dir / f"vllm-{port}.log"
        env = {**os.environ, **extra}
        env.pop("PYTHONPATH", None)  # the project's venv must not shadow vLLM's own packages
        log(f"engine vllm: starting {shown(argv, extra)}")
        log(f"engine vllm: server log {log_path}")
        with open(log_path, "wb") as out:
            try:
                proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        env=env, start_new_session=True)
            except OSError as e:
                raise EngineError(f"engine vllm: cannot start {exe}: {e}; install vLLM (on CPU: bash "
                                  ".ci/engines-up.sh) or set vllm.python") from None
        served = LORA_NAME if adapter_dir is not None else BASE_NAME
        desc = f"vllm({model_dir}{' + ' + adapter_dir if adapter_dir else ''})"
        model = cls(proc, f"http://127.0.0.1:{port}", served, log_path, desc, tokenizer.eos_token_id)
        try:
            model._wait_ready(spec.startup_timeout_s, log)
        except BaseException:
            model.close()
            raise
        return model

    def _wait_ready(self, timeout_s: float, log: Any) -> None:
        t0 = time.monotonic()
        while True:
            code = self.proc.poll()
            if code is not None:
                raise EngineError(f"engine vllm: the server exited with code {code} before it was ready{_shm_hint()}; "
                                  f"the end of its log ({self.log_path}):\n{_tail(self.log_path)}")
            try:
                if self.client.get("/health", timeout=2.0).status_code == 200:
                    models = self.client.get("/v1/models", timeout=5.0).json()
                    names = {m.get("id") for m in models.get("data", [])}
                    if self.served not in names:
                        raise EngineError(f"engine vllm: the server does not serve {self.served} (it has "
                                          f"{sorted(n for n in names if n)}); see {self.log_path}")
                    log(f"engine vllm: ready in {time.monotonic() - t0:.0f} s at {self.url}")
                    return
            except (httpx.HTTPError, ValueError):
                pass
            if time.monotonic() - t0 > timeout_s:
                raise EngineError(f"engine vllm: not ready after {timeout_s:.0f} s (vllm.startup_timeout_s); "
                                  f"the end of its log ({self.log_path}):\n{_tail(self.log_path)}")
            time.sleep(1.0)

    def _post(self, body: dict[str, Any], timeout_s: float | None) -> dict[str, Any]:
        if self.proc.poll() is not None:
            raise EngineError(f"engine vllm: the server has exited (code {self.proc.returncode}); see "
                              f"{self.log_path}")
        try:
            r = self.client.post("/v1/completions", json={"model": self.served, **body},
                                 timeout=timeout_s if timeout_s is not None else REQUEST_TIMEOUT_S)
        except httpx.HTTPError as e:
            raise EngineError(f"engine vllm: request failed: {e}") from None
        if r.status_code != 200:
            raise EngineError(f"engine vllm: {r.status_code} from the server: {r.text[:500]}")
        out: dict[str, Any] = r.json()
        return out

    def letter_logprobs(self, prompts: Sequence[Sequence[int]], letter_ids: Sequence[int],
                        timeout_s: float | None = None) -> torch.Tensor:
        letters = [int(t) for t in letter_ids]
        body = {"prompt": [list(map(int, p)) for p in prompts], "max_tokens": 1, "temperature": 0.0,
                "logprobs": len(letters), "allowed_token_ids": letters, "return_tokens_as_token_ids": True}
        choices = sorted(self._post(body, timeout_s)["choices"], key=lambda c: c["index"])
        if len(choices) != len(prompts):
            raise EngineError(f"engine vllm: {len(choices)} answers for {len(prompts)} prompts")
        out = torch.full((len(prompts), len(letters)), float("-inf"))
        col = {t: j for j, t in enumerate(letters)}
        for r, c in enumerate(choices):
            top = (c.get("logprobs") or {}).get("top_logprobs") or [{}]
            for key, value in (top[0] or {}).items():
                j = col.get(int(str(key).rpartition(":")[2])) if str(key).startswith("token_id:") else None
                if j is not None and value is not None:
                    out[r, j] = float(value)
        return out.log_softmax(-1)

    def generate_ids(self, prompt: Sequence[int], *, max_new_tokens: int, temperature: float = 0.0,
                     top_p: float = 1.0, seed: int | None = None, timeout_s: float | None = None) -> list[int]:
        """Streamed, so that at `timeout_s` what was generated so far is kept (as transformers' `max_time`) and
        the request is dropped (the server aborts a request whose client went away)."""
        body: dict[str, Any] = {"model": self.served, "prompt": [list(map(int, prompt))],
                                "max_tokens": int(max_new_tokens), "temperature": float(temperature),
                                "top_p": float(top_p), "return_token_ids": True, "stream": True}
        if seed is not None:
            body["seed"] = int(seed)
        if self.proc.poll() is not None:
            raise EngineError(f"engine vllm: the server has exited (code {self.proc.returncode}); see "
                              f"{self.log_path}")
        end = time.monotonic() + (timeout_s if timeout_s is not None else REQUEST_TIMEOUT_S)
        ids: list[int] = []
        try:
            with self.client.stream("POST", "/v1/completions", json=body,
                                    timeout=max(0.1, end - time.monotonic())) as r:
                if r.status_code != 200:
                    raise EngineError(f"engine vllm: {r.status_code} from the server: {r.read()[:500]!r}")
                for line in r.iter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        for c in json.loads(line[6:]).get("choices", []):
                            ids += [int(t) for t in (c.get("token_ids") or [])]
                    if time.monotonic() >= end:
                        break
        except httpx.TimeoutException:
            pass  # the deadline: keep what came
        except httpx.HTTPError as e:
            raise EngineError(f"engine vllm: request failed: {e}") from None
        return [t for t in ids if t != self.eos_id]

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self.client.close()
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=20)
            except (ProcessLookupError, PermissionError):
                pass
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
