"""Instance-level kernel patches (Liger, fused NF4+LoRA, chunked loss, padding-free attention) and ``select``, the one kernel switch."""
