"""Model FLOPs of the bench's training steps, for the model-FLOP utilisation (MFU) column.

Per sample of ``L`` real tokens (image tokens included) and one image of ``P`` = patches + 1 positions, counting
a multiply-add as 2 FLOPs and, for every weight matrix of ``N`` parameters, ``2N`` per token for its forward:

* LLM linear layers, frozen (NF4) but on the gradient path: forward ``2N`` + input gradient ``2N`` = **4N** per
  token (no weight gradient); LoRA adapters (trained): **6N**; the frozen ``lm_head``: **4N** on every token (the
  standard computation; the kit's chunked loss skips unlabelled rows, which shows up as higher MFU);
* causal attention per layer: forward ``2 L d`` per token (``Q K^T`` and ``A V``, half of the ``L x L`` square),
  backward twice that;
* the projector: **6N** per image token when trained in full; frozen + LoRA (TRL): 4N + 6N of its adapters;
* the CLIP tower: frozen and before anything trained, so forward only, **2N** per position plus ``4 P d`` of
  attention per layer; when LoRA sits in it (TRL) it is on the gradient path: 4N + 6N of its adapters;
* gradient checkpointing recomputes each checkpointed layer's forward in backward: **+2N** per token for the
  decoder layers (and their adapters, and attention's forward), and for the CLIP layers when it is enabled there.

``model`` FLOPs leave the recompute out (MFU, the useful work); ``hardware`` FLOPs include it (HFU). Padding is
never counted: a padded batch does more arithmetic for the same model FLOPs, which is the point of measuring it.
The MFU denominator is the measured matmul peak of the compute dtype (:func:`meter.matmul_peak`).
"""

from __future__ import annotations

from dataclasses import dataclass

from qlora_med.plan.estimate import ModelShape


@dataclass(frozen=True)
class Trained:
    """What a variant trains, from its worker's trainable parameter names."""

    lora_llm: int = 0
    lora_vision: int = 0
    lora_projector: int = 0
    projector_full: bool = True
    checkpointing: float = 1.0  # share of the LLM's decoder layers checkpointed (a worker's bool: 0 or 1)
    vision_checkpointing: bool = False

    @classmethod
    def from_result(cls, trainable: dict[str, int], checkpointing: bool | float) -> Trained:
        def total(part: str, lora: bool) -> int:
            return sum(n for name, n in trainable.items() if part in name and ("lora_" in name) == lora)

        vision = total("vision_tower", True)
        return cls(total("language_model", True), vision, total("multi_modal_projector", True),
                   total("multi_modal_projector", False) > 0, float(checkpointing), bool(checkpointing) and vision > 0)  # fmt: skip


def sample_flops(shape: ModelShape, length: int, trained: Trained) -> tuple[float, float]:
    """(model, hardware) FLOPs of one sample's forward + backward."""
    llm, vis = shape.llm, shape.vision
    n_lin, n_head = llm.linear_params, llm.vocab * llm.hidden
    attn = 2 * length * llm.q_dim * llm.layers  # forward, per token
    model = length * (4 * n_lin + 6 * trained.lora_llm + 4 * n_head + 3 * attn)
    recompute = length * (2 * n_lin + 2 * trained.lora_llm + attn) * trained.checkpointing
    if vis is not None:
        pos = vis.patches + 1
        v_attn = 4 * pos * vis.hidden * vis.layers  # forward, per position, non-causal
        if trained.lora_vision:
            model += pos * (4 * vis.params + 6 * trained.lora_vision + 3 * v_attn)
            if trained.vision_checkpointing:
                recompute += pos * (2 * vis.params + 2 * trained.lora_vision + v_attn)
        else:
            model += pos * (2 * vis.params + v_attn)
        proj = shape.projector_params
        per_token = 6 * proj if trained.projector_full else 4 * proj + 6 * trained.lora_projector
        model += shape.image_tokens * per_token
    return float(model), float(model + recompute)


def steps_flops(shape: ModelShape, batches: list[dict], trained: Trained) -> tuple[float, float]:
    """(model, hardware) FLOPs of the batches (each ``{"lengths": [...]}``)."""
    pairs = [sample_flops(shape, n, trained) for b in batches for n in b["lengths"]]
    return sum(m for m, _ in pairs), sum(h for _, h in pairs)
