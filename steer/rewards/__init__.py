"""Reward vectors: pluggable, composable scorers that map (conversation, response) to one reward per objective."""
