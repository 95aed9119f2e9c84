"""Fused kernels (Triton) with pure-PyTorch references; installed as ``qlora_med.kernels``."""
