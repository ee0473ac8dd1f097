"""Data: MCQ records, importers of public formats, the built-in generated sets, selection/dedupe/split, curriculum."""
