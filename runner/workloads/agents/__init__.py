"""Agents: the answer and question agents, where their models come from, procedural generators, format rules, matches."""
