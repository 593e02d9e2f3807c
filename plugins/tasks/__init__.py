"""Built-in tasks: the simulated-labeler world and JSONL files."""
