"""Pydantic models of job files: small sections composed into one model per job kind.

Every field has a description (it feeds `runner schema` and the docs); unknown keys are rejected.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from runner.spec.data_sources import ColumnMap, source_problem
from runner.spec.resource_keys import MOVED_RESOURCES, RANK_DEFAULTS, flat_resources, move_flat_resources  # noqa: F401

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")

# Values that reach a script, a command line or a manifest must match these in full (quoting is a second line
# of defence, not the only one). Each pattern is what its consumer accepts, not more.
ENV_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,254}")  # POSIX shell variable names
SLURM_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}(,[A-Za-z0-9_.-]{1,64}){0,15}")  # partition(s), account
SLURM_TIME_RE = re.compile(r"\d{1,7}(:\d{1,2}){0,2}|\d{1,4}-\d{1,2}(:\d{1,2}){0,2}|(?i:unlimited|infinite)")
K8S_LABEL_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")  # DNS-1123 label: namespaces
K8S_SUBDOMAIN_RE = re.compile(r"[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?")  # DNS-1123 subdomain: claims, classes
REGISTRY_RE = re.compile(r"[A-Za-z0-9.-]{1,253}(:\d{1,5})?(/[a-z0-9]+([._-][a-z0-9]+)*)*/?")
CONTROL_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")  # control characters but tab and newline
MOUNT_PATH_RE = re.compile(r"[^\x00-\x1f\x7f:,]{1,4096}")  # `docker -v SRC:DST:MODE` splits on ':'


def must_match(pattern: re.Pattern[str], v: str | None, what: str) -> str | None:
    if v is not None and not pattern.fullmatch(v):
        raise ValueError(f"{v!r} is not {what}")
    return v


class At(ValueError):
    """A validator's error about one field below the model it checks: the loader reports that field's line.

    `raise At("resources.nodes", "...")` in a job's model validator points at `resources: nodes:` in the file,
    not at the job's first line."""

    def __init__(self, path: str | tuple[str | int, ...], message: str):
        super().__init__(message)
        self.path = path if isinstance(path, tuple) else tuple(int(p) if p.isdigit() else p for p in path.split("."))


LORA_TARGETS_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


from runner.spec.section import Section  # noqa: E402  (re-exported: every section module uses it)
from runner.spec.train import TrainSpec  # noqa: E402

# --- where and how it runs -------------------------------------------------------------------------


class SlurmResources(Section):
    partition: str | None = Field(None, description="Slurm partition (default: the cluster's default partition).")
    account: str | None = Field(None, description="Slurm account.")
    time: str | None = Field(None, description="Wall-clock limit, Slurm syntax (e.g. `12:00:00`).")
    container: Literal["none", "apptainer", "pyxis"] = Field(
        "none",
        description="How Slurm runs the job: `none` (the project's .venv on shared storage), `apptainer` "
        "(a .sif of the image) or `pyxis` (`srun --container-image`).",
    )

    @field_validator("partition", "account")
    @classmethod
    def _slurm_name(cls, v: str | None) -> str | None:
        return must_match(SLURM_NAME_RE, v, "a Slurm name (letters, digits, '.', '_', '-'; partitions comma-separated)")

    @field_validator("time")
    @classmethod
    def _slurm_time(cls, v: str | None) -> str | None:
        return must_match(SLURM_TIME_RE, v, "a Slurm time limit (MINUTES, HH:MM:SS, D-HH:MM or UNLIMITED)")


class KubernetesResources(Section):
    namespace: str = Field("default", description="Kubernetes namespace.")
    storage_class: str | None = Field(None, description="Storage class for the run volume the runner creates.")
    storage_gb: int = Field(
        500, ge=1, description="Size of the run volume (runs + model cache) the job claims, in GB."
    )
    volume_claim: str | None = Field(
        None,
        description="An existing ReadWriteMany PersistentVolumeClaim for runs, data and cache; default: "
        "`qa-runner-runs`, created on first use and shared by the jobs of the namespace.",
    )

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, v: str) -> str:
        return must_match(K8S_LABEL_RE, v, "a Kubernetes namespace (1-63 lowercase letters, digits and '-')") or v

    @field_validator("storage_class", "volume_claim")
    @classmethod
    def _object_name(cls, v: str | None) -> str | None:
        return must_match(K8S_SUBDOMAIN_RE, v, "a Kubernetes object name (lowercase letters, digits, '-' and '.')")


class ContainerResources(Section):
    shm_gb: int = Field(16, ge=1, description="Size of /dev/shm inside the container (Docker, Kubernetes), in GB.")
    registry: str | None = Field(
        None,
        description="Registry prefix the cluster pulls the job's image from (e.g. `registry.example.com/team`); "
        "Kubernetes and Slurm/pyxis need the image pushed there.",
    )

    @field_validator("registry")
    @classmethod
    def _registry(cls, v: str | None) -> str | None:
        return must_match(REGISTRY_RE, v, "a registry prefix like registry.example.com:5000/team")


class Resources(Section):
    gpus: int = Field(0, ge=0, le=64, description="GPUs per node (0 = CPU only).")
    nodes: int = Field(1, ge=1, le=1024, description="Number of nodes (machines); >1 needs slurm or kubernetes.")
    gpu_type: Literal["mi300x", "mi250x", "h100", "h200", "a100", "auto"] = Field(
        "auto", description="GPU model the job is sized for; `auto` uses what preflight finds."
    )
    gpu_memory_gb: float | None = Field(
        None, gt=0, description="Memory per GPU in GB; defaults from gpu_type (mi300x: 192)."
    )
    cpus: int | None = Field(None, ge=1, description="CPU cores per node to request.")
    memory_gb: int | None = Field(None, ge=1, description="Host memory per node to request, in GB.")
    processes: int = Field(
        1, ge=1, le=64, description="Ranks per node on CPU (gpus: 0), on gloo; with GPUs each GPU is one rank."
    )
    strategy: Literal["auto", "ddp", "fsdp"] = Field(
        "auto", description="How several ranks hold the model: ddp (a replica each) or fsdp (sharded: accelerate's "
        "FSDP on GPUs; on CPU ranks the trainer's FSDP2 of the decoder layers); auto = fsdp on GPUs, ddp on CPU."
    )
    collective_timeout_s: int = Field(
        600, ge=10, le=86400,
        description="Seconds a rank waits in a collective before the run fails: a dead rank ends it, never hangs it.",
    )
    slurm: SlurmResources = Field(
        default_factory=SlurmResources, description="Slurm only: partition, account, time limit, container runtime."
    )
    kubernetes: KubernetesResources = Field(
        default_factory=KubernetesResources, description="Kubernetes only: namespace and the run volume."
    )
    container: ContainerResources = Field(
        default_factory=ContainerResources,
        description="The job's container: size of /dev/shm, registry a cluster pulls the image from.",
    )

    @model_validator(mode="before")
    @classmethod
    def _flat_keys(cls, data: Any) -> Any:
        # Stored runs and job_from_data callers may use the flat keys; the loader has already moved (and
        # warned about) a job file's, so only a key given twice is still here to report.
        if not isinstance(data, dict):
            return data
        data, _ = move_flat_resources(data)
        for old, (section, key) in MOVED_RESOURCES.items():
            if old in data and isinstance(data.get(section), dict) and key in data[section]:
                raise At(old, f"resources.{old} and resources.{section}.{key} are both given; remove "
                              f"resources.{old} (it moved to resources.{section}.{key})")
        return data

    @model_validator(mode="after")
    def _ranks(self) -> Resources:
        if self.processes > 1 and self.gpus > 0:
            raise At("processes", f"resources.processes={self.processes} is for CPU ranks (gpus: 0); with GPUs each "
                                  "GPU is one rank: remove processes and set gpus to the ranks per node")
        return self

    def world_size(self) -> int:
        """Ranks in all: one per GPU, or `processes` per node on CPU."""
        return self.nodes * (self.gpus if self.gpus > 0 else self.processes)


class Mount(Section):
    source: str = Field(description="Host path (or named volume) to mount.")
    target: str = Field(description="Path inside the container.")
    read_only: bool = Field(True, description="Mount read-only.")

    @field_validator("source", "target")
    @classmethod
    def _path(cls, v: str) -> str:
        return must_match(MOUNT_PATH_RE, v, "a mount path (no ':', ',' or control characters)") or v

    @field_validator("target")
    @classmethod
    def _absolute(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError(f"{v!r} is not an absolute path inside the container")
        return v


# --- model -------------------------------------------------------------------------------------------


class TinyModel(Section):
    hidden_size: int = Field(128, ge=16, description="Hidden size of the offline tiny Qwen2 model.")
    layers: int = Field(2, ge=1, le=48, description="Transformer layers of the tiny model.")
    heads: int = Field(4, ge=1, description="Attention heads of the tiny model.")
    pretrain_steps: int = Field(
        250, ge=0, description="Full-parameter pretraining steps on the built-in MCQ corpus (cached)."
    )
    seed: int = Field(0, description="Seed for the tiny model's initialisation and pretraining.")


# The named offline bases, for the host side (which never imports runner.workloads): the workload builds each into
# $RUNNER_CACHE/<name>/<key>/, a directory complete once it holds the marker file named here, and loads it with no
# network. `runner.workloads.model.loading.OFFLINE_BASES` holds their builders; tests keep the two tables equal.
OFFLINE_BASE_MARKERS = {"tiny": "pretrain.json", "smollm2-135m": "build.json"}
# Offline bases a job image cannot build itself (converting smollm2-135m needs PyPI and the `gguf` package), with
# the command that builds one into the cache on the host first.
HOST_BUILT_BASES = {"smollm2-135m": "python -m runner.workloads.model.smollm2 (or `just real-model`)"}


class ModelSpec(Section):
    base: str = Field(
        description="Base model: a Hugging Face id (`Qwen/Qwen2.5-7B-Instruct`), a local directory, or `tiny` "
        "(a small Qwen2 model built offline)."
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of `base`.")
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="Weights dtype: `auto` is bf16 on a GPU, fp32 on CPU."
    )
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field(
        "sdpa", description="Attention kernel."
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations to save memory.")
    params_b: float | None = Field(
        None, gt=0, description="Parameter count in billions, for preflight when the id is not known to it."
    )
    tiny: TinyModel = Field(default_factory=TinyModel, description="Shape of the `tiny` model.")


class PromptSpec(Section):
    style: Literal["plain", "chat", "mmlu"] = Field(
        "plain",
        description="How a question is shown to the model: `plain` (`Question:`, `A)` choices, `Answer:`), `chat` "
        "(the tokenizer's chat template; the letter starts the assistant turn) or `mmlu` (lm-evaluation-harness's "
        "zero-shot MMLU prompt).",
    )
    system: str | None = Field(None, max_length=4000, description="A system turn (`style: chat` only).")

    @model_validator(mode="after")
    def _system_needs_chat(self) -> PromptSpec:
        if self.system is not None and self.style != "chat":
            raise At("system", f"`system` is used only by `style: chat` (this prompt has style {self.style})")
        if self.system is not None and CONTROL_RE.search(self.system):
            raise At("system", "control characters (other than tab and newline) are not allowed in a system turn")
        return self


PROMPT_DESCRIPTION = (
    "The prompt contract (style, system turn). Unset: the style the adapter was trained with (recorded in "
    "its `prompt.json`), else `plain`."
)


class LoraSpec(Section):
    r: int = Field(16, ge=1, le=1024, description="LoRA rank.")
    alpha: int = Field(32, ge=1, description="LoRA alpha (scale = alpha / r).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: list[str] = Field(
        default_factory=lambda: list(LORA_TARGETS_ALL), min_length=1, description="Linear layers to adapt."
    )


# --- data --------------------------------------------------------------------------------------------

DataFormat = Literal["auto", "jsonl", "mmlu_csv", "arc", "openbookqa", "commonsenseqa", "tournament", "bigbench",
                     "hf"]


class DataSource(Section):
    path: str | None = Field(None, description="File or directory of MCQ data, or `builtin:<name>` for a data set "
                             "the runner generates (give `path` or `hf`).")
    hf: str | None = Field(None, description="A Hugging Face Hub data set id (`cais/mmlu`), read with `datasets`; "
                           "online, or from the Hugging Face cache (offline: save a copy and give its `path`).")
    config: str | None = Field(None, description="Configuration of the `hf` data set (`all`).")
    split: str | None = Field(None, description="Split of an `hf` set or `save_to_disk` folder (default: the only one).")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of the `hf` data set.")
    columns: ColumnMap | None = Field(None, description="Columns of a table read through `datasets` holding question, "
                                      "choices, answer, ... (implies `format: hf`); unset: the columns of those names.")
    format: DataFormat = Field("auto", description="Importer; `auto` picks from the extension and content (parquet, "
                               "arrow and `save_to_disk` folders: `hf`).")
    topic: str | None = Field(None, description="Topic for records that have none (MMLU: the file's subject).")
    limit: int | None = Field(None, ge=1, description="Use at most this many records (after shuffling).")
    topics: list[str] | None = Field(None, description="Keep only records of these topics.")
    remote: bool = Field(
        False, description="The path exists only where the job runs (a cluster's storage, inside the image): "
        "`runner validate` does not look for it here.",
    )

    @property
    def label(self) -> str:
        """How messages and manifests name the source: its path, or `hf:ID`."""
        return self.path if self.path is not None else f"hf:{self.hf}"

    @model_validator(mode="after")
    def _fields_agree(self) -> DataSource:
        key, message = source_problem(self) or (None, "")
        if message:
            raise At(key, message) if key else ValueError(message)
        return self


def source_list(v: object) -> object:
    """`file.jsonl` and `[a.jsonl, {path: b.csv}]` are shorthands for lists of data sources."""
    if isinstance(v, (str, dict)):
        v = [v]
    if isinstance(v, list):
        return [{"path": x} if isinstance(x, str) else x for x in v]
    return v


class Curriculum(Section):
    order: Literal["none", "difficulty", "loss"] = Field(
        "none",
        description="`difficulty` orders by the records' difficulty; `loss` scores each with the base model once.",
    )
    pacing: Literal["none", "linear", "step"] = Field(
        "none", description="How the pool widens from the easiest fraction to all records."
    )
    start_fraction: float = Field(0.3, gt=0.0, le=1.0, description="Fraction of the pool available at step 0.")
    full_at: float = Field(
        0.5, gt=0.0, le=1.0, description="Fraction of training after which the whole pool is available."
    )
    stages: int = Field(3, ge=1, le=100, description="Number of equal jumps of the pool for `pacing: step`.")


class Replay(Section):
    sources: list[DataSource] = Field(default_factory=list, description="General data to mix in.")
    fraction: float = Field(0.0, ge=0.0, lt=1.0, description="Target fraction of training tokens from replay.")
    self_replay: bool = Field(
        False, description="Also replay the base model's own correct answers on the training questions."
    )


class DataSpec(Section):
    train: list[DataSource] = Field(min_length=1, description="Training data sources.")
    val: list[DataSource] = Field(
        default_factory=list, description="Validation sources; empty = split `val_fraction` off the train data."
    )
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="Held-out fraction when `val` is empty.")
    val_limit: int | None = Field(
        None, ge=1, description="Validate on at most this many questions (a fixed, seeded subset)."
    )
    seed: int = Field(0, description="Seed for shuffling and splitting.")
    max_bad_rows: int = Field(
        0,
        ge=0,
        description="Bad rows a source may have: more fails the job listing each FILE:LINE; up to this many are "
        "skipped with a warning per row.",
    )
    curriculum: Curriculum = Field(default_factory=Curriculum, description="Curriculum ordering and pacing.")
    replay: Replay = Field(default_factory=Replay, description="Replay buffer against forgetting.")

    @field_validator("train", "val", mode="before")
    @classmethod
    def _sources(cls, v: object) -> object:
        return source_list(v)


# --- training ----------------------------------------------------------------------------------------


class MlflowSpec(Section):
    tracking_uri: str | None = Field(
        None, description="MLflow tracking server (`http://host:5000`) or store (`sqlite:///path.db`); default: a "
        "SQLite store at $RUNNER_HOME/mlflow/mlflow.db.",
    )
    experiment: str | None = Field(None, description="MLflow experiment (default: the job's name).")

    @field_validator("tracking_uri")
    @classmethod
    def _uri(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"(https?://[A-Za-z0-9.\-\[\]:]+(/[\w.\-/]*)?|sqlite:///[\w.\-/]+)", v):
            raise ValueError(f"{v!r} is not an http(s):// server or a sqlite:///PATH store; "
                             "write e.g. http://127.0.0.1:5000 or sqlite:///mlruns/mlflow.db")
        return v

    @field_validator("experiment")
    @classmethod
    def _experiment(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[\w.\-/ ]{1,200}", v):
            raise ValueError("an experiment name is 1-200 letters, digits, spaces, `.`, `_`, `-` or `/`")
        return v


class LoggingSpec(Section):
    tensorboard: bool = Field(False, description="Also write TensorBoard event files.")
    mlflow: MlflowSpec | None = Field(
        None, description="Track the run in MLflow (params, metrics, artifacts; `runner promote` mirrors the "
        "registry). `{}` uses a local SQLite store. Never changes the spec hash.",
    )


# --- jobs --------------------------------------------------------------------------------------------

Backend = Literal["local", "docker", "slurm", "kubernetes"]


class JobBase(Section):
    name: str = Field(description="Job name: lowercase letters, digits, `.`, `_`, `-` (names the run folder).")
    description: str = Field("", description="What this experiment is for.")
    backend: Backend = Field("local", description="Where it runs.")
    image: str = Field("cpu", description="Image definition in images/ (`rocm`, `cuda`, `cpu`).")
    resources: Resources = Field(default_factory=Resources, description="Hardware to request.")
    env: dict[str, str] = Field(default_factory=dict, description="Extra environment variables.")
    mounts: list[Mount] = Field(default_factory=list, description="Extra mounts (container backends).")
    tags: dict[str, str] = Field(default_factory=dict, description="Free-form labels recorded with the run.")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME_RE.fullmatch(v):
            raise ValueError(
                "must be 1-63 lowercase letters, digits, '.', '_' or '-', starting with a letter or digit"
            )
        return v

    @field_validator("env")
    @classmethod
    def _env(cls, v: dict[str, str]) -> dict[str, str]:
        for key, value in v.items():
            if not ENV_KEY_RE.fullmatch(key):
                raise At((key,), f"{key!r} is not an environment variable name (letters, digits and '_', "
                                       "not starting with a digit)")
            if "\x00" in value:
                raise At((key,), "holds a NUL character, which no environment variable can")
        return v

    @field_validator("tags")
    @classmethod
    def _tags(cls, v: dict[str, str]) -> dict[str, str]:
        for key, value in v.items():
            if CONTROL_RE.search(key) or "\n" in key or CONTROL_RE.search(value):
                raise At((key,), "holds control characters; tags are plain text")
        return v

    @model_validator(mode="after")
    def _multi_node(self) -> JobBase:
        if self.resources.nodes > 1 and self.backend in ("local", "docker"):
            raise At(
                "resources.nodes",
                f"resources.nodes={self.resources.nodes} needs backend slurm or kubernetes, not {self.backend}",
            )
        return self


class PrepareJob(JobBase):
    kind: Literal["prepare"] = Field(description="Imports, deduplicates and splits MCQ data.")
    data: DataSpec = Field(description="Sources to import and how to split them.")


class TrainJob(JobBase):
    kind: Literal["train"] = Field(description="LoRA fine-tuning.")
    model: ModelSpec = Field(description="Base model.")
    prompt: PromptSpec | None = Field(
        None, description="The prompt contract the adapter is trained with (unset: `plain`); recorded with it."
    )
    lora: LoraSpec = Field(default_factory=LoraSpec, description="LoRA adapter shape.")
    data: DataSpec = Field(description="Training and validation data.")
    train: TrainSpec = Field(default_factory=TrainSpec, description="Optimisation settings.")
    logging: LoggingSpec = Field(default_factory=LoggingSpec, description="Extra logging outputs.")

    @model_validator(mode="after")
    def _sharded_on_cpu(self) -> TrainJob:
        res = self.resources
        if res.strategy == "fsdp" and res.gpus == 0 and res.world_size() > 1 and self.train.compile:
            raise At("train.compile", "train.compile with resources.strategy fsdp on CPU ranks is not supported (the "
                     "compiled layers would trace FSDP's gathers); drop train.compile or use strategy ddp")
        return self
