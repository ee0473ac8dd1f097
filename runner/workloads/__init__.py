"""Code that runs inside the container or local process (imports torch). Entry: python -m runner.workloads."""
