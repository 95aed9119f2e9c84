"""``qlora-med bench``: the kit against a hand-written QLoRA loop, each variant in a fresh process."""
