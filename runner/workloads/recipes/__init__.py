"""Recipes: one readable file per job kind (prepare, train, eval, serve, tournament), top to bottom, over the libraries."""
