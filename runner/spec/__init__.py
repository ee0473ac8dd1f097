"""Job specifications: Pydantic models per job kind (the table of kinds is kinds.py) and the loader."""

from runner.spec.kinds import JOB_MODELS
from runner.spec.loader import Job, Problem, SpecError, job_from_data, job_from_stored, load_job, spec_hash

__all__ = ["JOB_MODELS", "Job", "Problem", "SpecError", "job_from_data", "job_from_stored", "load_job", "spec_hash"]
