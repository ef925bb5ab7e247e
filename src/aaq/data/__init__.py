"""Text a run reads: calibration and held-out windows of a corpus, and chat-form calibration conversations."""
