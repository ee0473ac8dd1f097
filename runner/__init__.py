"""qa-runner: declarative runner for LLM question-answering agent experiments."""

__version__ = "0.1.0"
