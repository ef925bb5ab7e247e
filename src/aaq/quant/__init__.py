"""Quantization: quantizer specs and schemes, fake-quantized linears and KV cache, integer codes and packing."""
