"""Job specifications: Pydantic models per job kind and the loader that reads job files."""

from runner.spec.loader import Job, Problem, SpecError, job_from_data, load_job, spec_hash
from runner.spec.models import JOB_MODELS

__all__ = ["JOB_MODELS", "Job", "Problem", "SpecError", "job_from_data", "load_job", "spec_hash"]
