"""Test-only helpers: a shared trained run, the Hub stand-in, Triton-interpreter children, old loaders."""
