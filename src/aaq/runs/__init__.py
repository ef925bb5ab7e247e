"""Run folders: output-folder markers and checksums, atomic writes and provenance, saving and loading quantized models."""
