"""Scoring: the MCQ prompt, single-pass letter scoring, calibration, summaries and the eval report."""
