"""Job specifications: Pydantic models per job kind and the loader that reads job files."""

# Job kinds defined in their own modules (eval, serve, tournament) register themselves in JOB_MODELS on import.
from runner.spec import eval as _eval  # noqa: F401
from runner.spec import serve as _serve  # noqa: F401
from runner.spec import tournament as _tournament  # noqa: F401
from runner.spec.loader import Job, Problem, SpecError, job_from_data, job_from_stored, load_job, spec_hash
from runner.spec.models import JOB_MODELS

__all__ = ["JOB_MODELS", "Job", "Problem", "SpecError", "job_from_data", "job_from_stored", "load_job", "spec_hash"]
