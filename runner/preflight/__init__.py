"""Preflight: what hardware is here (probe), what the job needs per component (shapes, memory), whether it
fits and what would (report, gate). Runs in well under a second and never imports torch."""
