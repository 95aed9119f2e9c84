"""Building (tiny, composed) and loading (dtype, quantization, projector) LLaVA models."""
