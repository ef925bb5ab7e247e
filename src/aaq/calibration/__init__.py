"""Calibration: the loop that learns transforms, its losses and teachers, layer-by-layer execution, and pair statistics."""
