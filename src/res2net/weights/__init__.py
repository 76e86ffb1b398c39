"""Checkpoint formats (MindSpore .ckpt, torch pickles, safetensors), key mapping and the table
of published weights."""
