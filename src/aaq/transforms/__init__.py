"""Transforms: Hadamard constructions, rotation math and fusion, learnable transforms, online rotations."""
