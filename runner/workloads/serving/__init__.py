"""Serving: the micro-batcher, the HTTP app and its metrics."""
