"""Analytic memory and step-time model of one QLoRA training step of a LLaVA-style VLM.

Per-GPU bytes are *static* (frozen weights, trainable params, optimizer states), *gradients* (kept
all step when accumulating, else only at the end of backward) and *transients* alive in one phase:
``vision`` (frozen tower forward, all hidden states kept), ``loss`` (saved activations + logits and
cross-entropy), ``backward`` (saved activations + backward working set), ``recompute`` (with checkpointing:
the checkpointed layers' inputs + one recomputed layer + the working set) and ``optimizer``. Peak = static +
grads + the largest phase.

Saved for backward per decoder layer and token (HF Llama/Mistral, frozen 4-bit base, PEFT LoRA; ``c``
compute bytes; frozen linears save nothing): each RMSNorm its fp32 input (2 x 4h); LoRA A the normed
outputs (2ch); SDPA q, k, v, output and log-sum-exp (c(2q + 2kv) + 4 heads; eager adds the s x s
probabilities and a transposed output copy); the SwiGLU MLP gate, up, act(gate), product (4ci); each
LoRA its r-wide A output and, with dropout, the dropped input and a bool mask. Checkpointing keeps each
checkpointed layer's input (ch) and recomputes one layer in backward, where the MLP gradients in flight
(c(i + h)) and one dequantized 4-bit weight add up. Per-layer checkpointing (``checkpoint_layers``) does
this for the first k decoder layers only: backward reaches them after the later, fully saved layers have
freed their activations, so the recompute phase holds only the k layer inputs. Cross-entropy in fp32: log-softmax output + its gradient +
the incoming gradient = 12 B per logit (compute-dtype logits and the upcast are freed by then).
These terms match measured CPU peaks within a few percent (benchmarks/validate_planner.py).

Step FLOPs: a frozen base needs the forward (2N per token) and the input-gradient half of backward
(2N) but no weight gradients, so ~4N per token, 6N with checkpointing (forward recomputed; 4N + 2N k/L
for k of L layers checkpointed); attention,
LoRA (6 per param), the projector (6N) and the frozen vision forward (2N) are added.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

GIB = 1024**3
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
OPTIMIZER_STATE_BYTES = {"adamw": 8.0, "paged_adamw_32bit": 8.0, "adamw_8bit": 2.0, "paged_adamw_8bit": 2.0}
# bytes per logit element at the loss/backward peak, see the module docstring
CE_BYTES = {"full": 12.0, "legacy": 16.0}
CUDA_CONTEXT_GIB = 0.75  # CUDA context + cuBLAS/cuDNN workspaces, outside torch's allocator (0.5-1 GiB)


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


@dataclass(frozen=True)
class LLMShape:
    """Decoder-only language model (Llama/Mistral layout: SwiGLU MLP, RMSNorm, GQA)."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    head_dim: int | None = None
    tie_embeddings: bool = False

    def __post_init__(self) -> None:
        _check(min(self.layers, self.hidden, self.intermediate, self.heads, self.kv_heads, self.vocab) > 0,
               "LLM shape sizes must be positive")
        _check(self.heads % self.kv_heads == 0, "heads must be a multiple of kv_heads")

    @property
    def q_dim(self) -> int:
        return self.heads * (self.head_dim or self.hidden // self.heads)

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * (self.head_dim or self.hidden // self.heads)

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear in one decoder layer."""
        h, i, q, kv = self.hidden, self.intermediate, self.q_dim, self.kv_dim
        return {"q": (h, q), "k": (h, kv), "v": (h, kv), "o": (q, h), "gate": (h, i), "up": (h, i), "down": (i, h)}

    @property
    def linear_params(self) -> int:
        return self.layers * sum(a * b for a, b in self.linears().values())

    @property
    def unquantized_params(self) -> int:
        """Embeddings, lm_head and norms (kept in 16/32 bit)."""
        return self.vocab * self.hidden * (1 if self.tie_embeddings else 2) + (2 * self.layers + 1) * self.hidden


@dataclass(frozen=True)
class VisionShape:
    """CLIP-style ViT vision tower (frozen)."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    image_size: int
    patch_size: int

    @property
    def patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def params(self) -> int:
        h = self.hidden
        layer = 4 * (h * h + h) + 2 * h * self.intermediate + self.intermediate + h + 4 * h
        return self.layers * layer + 3 * self.patch_size**2 * h + (self.patches + 2) * h + 4 * h


@dataclass(frozen=True)
class ModelShape:
    """A LLaVA-style model: vision tower -> projector -> LLM (vision None for a text-only LLM)."""

    name: str
    llm: LLMShape
    vision: VisionShape | None = None
    projector: str = "mlp2x_gelu"  # mlp2x_gelu | linear | patch_merger (Qwen: 2x2 patches -> MLP)
    llm_image_tokens: int | None = None  # families whose LLM tokens per image are not the tower's patches
    tower_crops: int = 1  # tower passes per image (LLaVA-NeXT any-res: the base image + its tiles)

    def __post_init__(self) -> None:
        _check(self.projector in ("mlp2x_gelu", "linear", "patch_merger"), f"unknown projector {self.projector!r}")

    @property
    def image_tokens(self) -> int:
        """LLM tokens per image: one per patch (CLS dropped) for LLaVA: 256 at 224 px, 576 at 336 px (patch 14);
        the family's own count otherwise (LLaVA-NeXT's tiles, Qwen's merged patches, Gemma 3's pooled 256)."""
        if self.llm_image_tokens is not None:
            return self.llm_image_tokens
        return self.vision.patches if self.vision else 0

    @property
    def projector_params(self) -> int:
        if not self.vision:
            return 0
        hv, h = self.vision.hidden, self.llm.hidden
        if self.projector == "patch_merger":  # 4 merged patches -> same-width hidden layer -> the LLM's width
            return 4 * hv * (4 * hv + 1) + 4 * hv * h + h
        return hv * h + h + (h * h + h if self.projector == "mlp2x_gelu" else 0)


@dataclass(frozen=True)
class RunSpec:
    """Settings of one training run that change memory or time (per GPU unless noted)."""

    micro_batch: int = 1
    grad_accum: int = 1  # > 1: gradients live through every micro-batch (else only at the end of backward)
    seq_len: int = 2048  # LLM tokens per sample, image tokens included
    images_per_sample: int = 1
    lora_rank: int = 64
    lora_targets: tuple[str, ...] = LORA_TARGETS
    lora_dropout: float = 0.05
    optimizer: str = "adamw"  # see OPTIMIZER_STATE_BYTES; paged_* can spill to CPU under pressure
    grad_checkpointing: bool = True
    checkpoint_layers: int | None = None  # with checkpointing: the first k decoder layers (None: all)
    ce: str = "full"  # full (HF) | legacy (transformers<4.45) | chunked (logits kept, fp32 per chunk) | fused
    ce_chunks: int = 8
    compute_dtype: str = "bf16"
    quantization: str = "nf4"  # nf4 | int8 | none
    double_quant: bool = True
    trainable_dtype: str = "fp32"  # LoRA and projector params/grads/states (8-bit states excepted)
    embed_dtype: str | None = None  # embeddings, lm_head, norms; default compute dtype
    vision_dtype: str | None = None  # default compute dtype
    attention: str = "sdpa"  # sdpa (flash / mem-efficient: no s*s matrix) | eager
    padded: bool = True  # padded batches: 4-D mask and K/V repeated for GQA (HF falls back from enable_gqa)
    autocast: bool = True  # LoRA runs in compute dtype; False + fp32 LoRA: fp32 input copies per LoRA
    device: str = "cuda"  # cuda | cpu
    n_gpus: int = 1
    sharding: str = "none"  # none (DDP replicas) | zero2 | fsdp (full shard; bnb quant constants replicated)
    context_gib: float | None = None  # framework/CUDA context; default CUDA_CONTEXT_GIB on cuda, 0 on cpu

    def __post_init__(self) -> None:
        _check(min(self.micro_batch, self.grad_accum, self.seq_len, self.n_gpus) >= 1 and self.lora_rank >= 0,
               "batch, accumulation, seq, GPUs and rank must be positive")
        _check(self.checkpoint_layers is None or self.checkpoint_layers >= 1,
               "checkpoint_layers must be at least 1 (turn grad_checkpointing off for none)")
        _check(set(self.lora_targets) <= set(LORA_TARGETS), f"lora_targets must be among {LORA_TARGETS}")
        dtypes = [d for d in (self.compute_dtype, self.trainable_dtype, self.embed_dtype, self.vision_dtype) if d]
        for name, value, allowed in (("optimizer", self.optimizer, OPTIMIZER_STATE_BYTES),
                                     ("ce", self.ce, ("full", "legacy", "chunked", "fused")),
                                     ("quantization", self.quantization, ("nf4", "int8", "none")),
                                     ("device", self.device, ("cuda", "cpu")), ("attention", self.attention, ("sdpa", "eager")),
                                     ("sharding", self.sharding, ("none", "zero2", "fsdp")),
                                     *(("dtype", d, DTYPE_BYTES) for d in dtypes)):
            _check(value in allowed, f"{name} must be one of {sorted(allowed)}, got {value!r}")

    def checkpointed(self, layers: int) -> int:
        """How many of a model's ``layers`` decoder layers this run checkpoints."""
        if not self.grad_checkpointing:
            return 0
        return layers if self.checkpoint_layers is None else min(self.checkpoint_layers, layers)

    def with_checkpointed(self, k: int, layers: int) -> RunSpec:
        """This run checkpointing the first ``k`` of ``layers`` decoder layers (0: off, ``layers``: all)."""
        return replace(self, grad_checkpointing=k > 0, checkpoint_layers=k if 0 < k < layers else None)


def quantized_bytes_per_param(quantization: str, double_quant: bool = True, in_features: int = 4096,
                              dtype_bytes: int = 2) -> float:
    """Storage of a frozen linear weight per parameter.

    NF4 (bitsandbytes, blocks of 64): 0.5 B of 4-bit codes + one absmax per block, fp32 (4/64 B) or,
    with double quantization, 8-bit (1/64 B) plus an fp32 absmax per 256 blocks (4/16384 B):
    0.5159 B/param. LLM.int8: 1 B + an fp32 scale per output row. none: compute dtype.
    """
    if quantization == "nf4":
        return 0.5 + (1 / 64 + 4 / (64 * 256) if double_quant else 4 / 64)
    if quantization == "int8":
        return 1.0 + 4 / in_features
    return float(dtype_bytes)


@dataclass(frozen=True)
class Component:
    """One line of the estimate; ``phases`` lists where a transient is alive ('' = always)."""

    name: str
    bytes: float
    kind: str  # static | grad | transient | context
    phases: tuple[str, ...] = ()
    note: str = ""


@dataclass(frozen=True)
class MemoryEstimate:
    """Per-GPU components and the resulting peak of one micro-batch step."""

    components: tuple[Component, ...]

    def total(self, kind: str) -> float:
        return sum(c.bytes for c in self.components if c.kind == kind)

    @property
    def phases(self) -> dict[str, float]:
        names = ("vision", "loss", "backward", "recompute", "optimizer")
        return {p: sum(c.bytes for c in self.components if c.kind == "transient" and p in c.phases) for p in names}

    @property
    def peak_phase(self) -> str:
        phases = self.phases
        return max(phases, key=phases.__getitem__)

    @property
    def step_bytes(self) -> float:
        """Peak above the static footprint: what a training step adds (gradients + transients)."""
        return self.total("grad") + max(self.phases.values())

    @property
    def peak_bytes(self) -> float:
        """Peak including the CUDA context: compare with the card."""
        return self.total("context") + self.total("static") + self.step_bytes

    @property
    def allocated_peak_bytes(self) -> float:
        """Peak as torch's allocator reports it (no context)."""
        return self.peak_bytes - self.total("context")


def estimate_memory(model: ModelShape, run: RunSpec) -> MemoryEstimate:
    """Per-GPU memory of one training step of ``model`` under ``run`` (bytes)."""
    llm, vis = model.llm, model.vision
    c = DTYPE_BYTES[run.compute_dtype]
    u = 4  # RMSNorm keeps an fp32 copy of its input (the input itself when computing in fp32)
    e, tb = DTYPE_BYTES[run.embed_dtype or run.compute_dtype], DTYPE_BYTES[run.trainable_dtype]
    vb = DTYPE_BYTES[run.vision_dtype or run.compute_dtype]
    b, s, n = run.micro_batch, run.seq_len, run.n_gpus
    t = b * s
    shard = n if run.sharding == "fsdp" else 1
    opt_shard = n if run.sharding in ("fsdp", "zero2") else 1
    lin = llm.linears()
    comps: list[Component] = []

    # -- static: frozen weights
    q_code = {"nf4": 0.5, "int8": 1.0}.get(run.quantization, float(c))
    q_total = sum(quantized_bytes_per_param(run.quantization, run.double_quant, i, c) * i * o for i, o in lin.values())
    q_code_total = sum(q_code * i * o for i, o in lin.values())
    qbytes = llm.layers * (q_code_total / shard + (q_total - q_code_total))
    comps.append(Component(f"LLM linear weights ({run.quantization}{'+DQ' if run.double_quant and run.quantization == 'nf4' else ''})",
                           qbytes, "static", note=f"{llm.linear_params / 1e9:.2f}B params"))
    emb = llm.unquantized_params * e
    # FSDP: the root unit (embeddings, lm_head, final norm) stays gathered for the whole step
    comps.append(Component("embeddings + lm_head + norms", emb / shard + (emb if shard > 1 else 0), "static",
                           note=f"{'fp32' if e == 4 else '16-bit'}" + (", gathered root unit" if shard > 1 else "")))
    if shard > 1:
        layer_unit = sum(q_code * i * o for i, o in lin.values())
        comps.append(Component("FSDP gathered layers (current + prefetch)", 2 * layer_unit, "static"))
    if vis:
        comps.append(Component("vision tower (frozen)", vis.params * vb, "static", note=f"{vis.params / 1e6:.0f}M params"))

    # -- trainable: LoRA and projector (params, grads, optimizer states)
    lora_params = llm.layers * sum(run.lora_rank * (lin[k][0] + lin[k][1]) for k in run.lora_targets)
    opt_b = OPTIMIZER_STATE_BYTES[run.optimizer] * (tb / 4 if run.optimizer in ("adamw", "paged_adamw_32bit") else 1)
    ddp_bucket = 1 if n > 1 and run.sharding == "none" else 0  # DDP keeps a flat copy of the gradients
    for name, p in (("LoRA", lora_params), ("projector", model.projector_params)):
        if p:
            comps.append(Component(f"{name} params", p * tb / shard, "static", note=f"{p / 1e6:.1f}M, {run.trainable_dtype}"))
            comps.append(Component(f"{name} optimizer states", p * opt_b / opt_shard, "static", note=run.optimizer))
            grads = p * tb * (1 + ddp_bucket) / opt_shard
            if run.grad_accum > 1:
                comps.append(Component(f"{name} gradients", grads, "grad", note="kept across micro-batches"))
            else:
                comps.append(Component(f"{name} gradients", grads, "transient", ("optimizer",), note="end of backward"))

    # -- transients: activations
    acts = _layer_activation_bytes(llm, run, c, u)
    k = run.checkpointed(llm.layers)
    both, bwd = ("loss", "backward", "recompute"), ("backward", "recompute")
    if k:  # backward recomputes the first k layers after the later layers' activations are freed
        comps.append(Component("LLM checkpointed layer inputs", k * t * c * llm.hidden, "transient", both,
                               note=f"{k} of {llm.layers} layers"))
        shared = c * llm.hidden if c == u else 0  # in fp32 the first RMSNorm saves the checkpointed input itself
        comps.append(Component("recomputed layer", t * (acts - shared), "transient", ("recompute",)))
    if k < llm.layers:
        comps.append(Component("LLM saved activations", (llm.layers - k) * t * acts, "transient", ("loss", "backward"),
                               note=f"{llm.layers - k} full layers"))
    comps.append(Component("final norm input", t * u * llm.hidden, "transient", ("loss",)))
    comps.append(Component("backward working set", t * c * (llm.intermediate + llm.hidden), "transient",
                           bwd, note="grads in flight in one layer's MLP"))
    if run.quantization != "none":
        big = max(i * o for i, o in lin.values())
        comps.append(Component("dequantized weight (largest)", big * c, "transient", bwd,
                               note="4-bit weight dequantized for a matmul"))
    if run.padded:
        comps.append(Component("attention mask (padded batch)", b * s * s, "transient", both))
    if vis:
        img = b * run.images_per_sample * model.tower_crops
        pos = vis.patches + 1
        proj = img * (pos * vis.hidden + 2 * model.image_tokens * llm.hidden) * c
        comps.append(Component("projector activations", proj, "transient", both))
        vis_fwd = img * pos * vb * ((vis.layers + 1) * vis.hidden + 4 * vis.hidden + 2 * vis.intermediate)
        if run.attention == "eager":
            vis_fwd += img * vis.heads * pos * pos * vb * 2
        comps.append(Component("vision forward (all hidden states)", vis_fwd + t * llm.hidden * c, "transient", ("vision",)))

    # -- transients: logits and cross-entropy
    V = llm.vocab
    if run.ce in CE_BYTES:
        ce, note = t * V * CE_BYTES[run.ce], f"{CE_BYTES[run.ce]:.0f} B per logit"
    elif run.ce == "chunked":
        ce, note = t * V * c + t / run.ce_chunks * V * 8, f"{c}-byte logits + fp32 loss per 1/{run.ce_chunks} chunk"
    else:  # fused linear + CE (Liger): a chunk of ~t*h/V tokens, grad of the hidden states kept
        ce, note = t * llm.hidden * (c + 8) + t * llm.hidden * c, "fused linear+CE chunks"
    comps.append(Component("logits + cross-entropy", ce, "transient", ("loss",), note=note))

    ctx = CUDA_CONTEXT_GIB if run.context_gib is None and run.device == "cuda" else (run.context_gib or 0.0)
    if ctx:
        comps.append(Component("CUDA context + workspaces", ctx * GIB, "context"))
    return MemoryEstimate(tuple(comps))


def _layer_activation_bytes(llm: LLMShape, run: RunSpec, c: int, u: int) -> float:
    """Bytes saved for backward by one decoder layer, per token (see the module docstring)."""
    h, i, q, kv = llm.hidden, llm.intermediate, llm.q_dim, llm.kv_dim
    kv_saved = q if (run.padded and llm.kv_heads < llm.heads) else kv  # repeat_kv when a mask is given
    total = 2 * u * h + c * (2 * h + 2 * q + 2 * kv_saved) + 4 * llm.heads + c * 4 * i
    if run.attention == "eager":  # probabilities + pre-softmax scores; output transposed to a contiguous copy
        total += llm.heads * run.seq_len * c * 2 + c * q
    lin = llm.linears()
    r = run.lora_rank
    for k in run.lora_targets:
        in_f = lin[k][0]
        total += r * c
        if run.lora_dropout > 0:  # dropped input + bool mask
            total += in_f * (c + 1)
        if not run.autocast and run.trainable_dtype != run.compute_dtype:
            total += in_f * DTYPE_BYTES[run.trainable_dtype]  # PEFT casts x to the LoRA dtype
    return total


def step_flops(model: ModelShape, run: RunSpec) -> float:
    """FLOPs of one micro-batch (forward + backward, + recompute with checkpointing) on one GPU."""
    llm, vis = model.llm, model.vision
    t = run.micro_batch * run.seq_len
    lin = llm.linears()
    lora = llm.layers * sum(run.lora_rank * (lin[k][0] + lin[k][1]) for k in run.lora_targets)
    n_lin, n_head = llm.linear_params, llm.vocab * llm.hidden
    attn = 2 * run.seq_len * llm.q_dim * llm.layers  # causal QK^T and AV, per token, forward
    fwd = 2 * (n_lin + n_head + lora) + attn
    bwd = 2 * (n_lin + n_head) + 4 * lora + 2 * attn  # input grads only for frozen weights
    rec = (2 * (n_lin + lora) + attn) * run.checkpointed(llm.layers) / llm.layers
    total = t * (fwd + bwd + rec)
    if vis:
        images = run.micro_batch * run.images_per_sample
        total += images * model.tower_crops * (vis.patches + 1) * 2 * vis.params  # frozen tower: forward only
        total += images * model.image_tokens * 6 * model.projector_params
    return float(total)


@dataclass(frozen=True)
class GPU:
    """A card: memory (GiB) and dense 16-bit tensor peak (TFLOP/s)."""

    name: str
    memory_gib: float
    peak_tflops: float


GPUS = {g.name: g for g in (
    GPU("a100-40gb", 40, 312), GPU("a100-80gb", 80, 312), GPU("h100-80gb", 80, 989), GPU("l4", 24, 121),
    GPU("a10g", 24, 70), GPU("rtx3090", 24, 71), GPU("rtx4090", 24, 165), GPU("t4", 16, 65), GPU("v100-32gb", 32, 125),
)}
DEFAULT_TFLOPS = 125.0  # assumed when only a memory size is given


def parse_gpu(spec: str) -> GPU:
    """'24GB' / '24' / '40GiB' (size only, GB taken as GiB) or a name from ``GPUS``."""
    key = spec.strip().lower()
    if key in GPUS:
        return GPUS[key]
    num = key.removesuffix("gib").removesuffix("gb").removesuffix("g")
    try:
        return GPU(f"{float(num):g}GB card", float(num), DEFAULT_TFLOPS)
    except ValueError:
        raise ValueError(f"unknown GPU {spec!r}: give a size like 24GB or one of {', '.join(GPUS)}") from None


@dataclass(frozen=True)
class Choice:
    """Settings picked by ``choose_settings`` and what they cost."""

    run: RunSpec
    estimate: MemoryEstimate
    step_time_s: float  # one optimizer step (global batch) on all GPUs
    budget_bytes: float
    notes: tuple[str, ...] = field(default=())

    @property
    def grad_accum(self) -> int:
        return self.run.grad_accum

    @property
    def global_batch(self) -> int:
        return self.run.micro_batch * self.run.grad_accum * self.run.n_gpus


def step_time_s(model: ModelShape, run: RunSpec, peak_tflops: float, mfu: float) -> float:
    """Seconds per optimizer step: all micro-batches' FLOPs at ``mfu`` of the peak (GPUs in parallel)."""
    return step_flops(model, run) * run.grad_accum / (peak_tflops * 1e12 * mfu)


def fewest_checkpointed_layers(model: ModelShape, run: RunSpec, budget_bytes: float) -> int | None:
    """Fewest decoder layers to checkpoint (0 = none) for ``run``'s step to fit ``budget_bytes``; None when even
    checkpointing every layer does not fit. Each checkpointed layer trades its saved activations for its input, so
    the peak falls with every layer added and a bisection finds the least."""
    layers = model.llm.layers

    def fits(k: int) -> bool:
        return estimate_memory(model, run.with_checkpointed(k, layers)).peak_bytes <= budget_bytes

    if not fits(layers):
        return None
    low, high = 0, layers  # fits(high) holds
    while low < high:
        mid = (low + high) // 2
        low, high = (low, mid) if fits(mid) else (mid + 1, high)
    return high


def choose_settings(model: ModelShape, card_gib: float, n_gpus: int = 1, global_batch: int = 128, seq: int = 2048,
                    *, base: RunSpec | None = None, margin: float = 0.10, peak_tflops: float = DEFAULT_TFLOPS,
                    mfu: float = 0.35, min_seq: int | None = None) -> Choice | None:
    """Fastest settings that fit ``(1 - margin) * card_gib`` and keep ``global_batch``.

    Tries, for each micro-batch (a divisor of ``global_batch / n_gpus``, largest first): no checkpointing with
    AdamW (4N per token); then, at the largest micro-batch that fits with checkpointing, the fewest leading decoder
    layers checkpointed (4N + 2N k/L) with AdamW, then with paged 8-bit AdamW. A smaller micro-batch is taken to drop
    checkpointing altogether, never to checkpoint a few layers fewer: each micro-batch dequantizes every 4-bit
    weight again, which a constant-MFU step time does not see. If nothing fits at ``seq``, the max length is halved
    down to ``min_seq`` (image tokens + 128). ``margin`` covers allocator fragmentation (reserved vs allocated).
    """
    _check(global_batch % n_gpus == 0, f"global batch {global_batch} is not divisible by {n_gpus} GPUs")
    per_gpu = global_batch // n_gpus
    base = replace(base or RunSpec(), n_gpus=n_gpus)
    budget = card_gib * (1 - margin) * GIB
    floor = min_seq or model.image_tokens + 128
    micro = [m for m in range(min(per_gpu, 64), 0, -1) if per_gpu % m == 0]
    layers = model.llm.layers
    length, notes = seq, []
    while length >= floor:
        runs = [replace(base, micro_batch=mb, grad_accum=per_gpu // mb, seq_len=length, optimizer=opt)
                for opt in ("adamw", "paged_adamw_8bit") for mb in micro]
        chosen = next((r.with_checkpointed(0, layers) for r in runs[: len(micro)]
                       if fewest_checkpointed_layers(model, r, budget) == 0), None)  # fmt: skip
        for run in runs if chosen is None else ():
            k = fewest_checkpointed_layers(model, run, budget)
            if k is not None:
                chosen = run.with_checkpointed(k, layers)
                break
        if chosen is not None:
            if length < seq:
                notes.append(f"max length cut from {seq} to {length} tokens to fit")
            return Choice(chosen, estimate_memory(model, chosen), step_time_s(model, chosen, peak_tflops, mfu), budget,
                          tuple(notes))
        length //= 2
    return None


def _llava(name: str, llm: LLMShape, vision: VisionShape) -> ModelShape:
    return ModelShape(name, llm, vision, "mlp2x_gelu")


_MISTRAL_7B = LLMShape(32, 4096, 14336, 32, 8, 32000)
_LLAMA_7B = LLMShape(32, 4096, 11008, 32, 32, 32000)
_CLIP_L_336 = VisionShape(24, 1024, 4096, 16, 336, 14)
PRESETS: dict[str, ModelShape] = {
    "llava-med-v1.5": _llava("llava-med-v1.5", _MISTRAL_7B, _CLIP_L_336),
    # The other families' published 7B-class shapes (their config.json), at the recipes' image sides:
    # LLaVA-NeXT any-res at 672 px = base 576 + 48x48 tile tokens + 48 newlines; Qwen2.5-VL at 448 px = 1024
    # patches merged 2x2; Gemma 3's 896 px SigLIP pooled to 256.
    "llava-1.5-7b": _llava("llava-1.5-7b", LLMShape(32, 4096, 11008, 32, 32, 32064), _CLIP_L_336),
    "llava-next-mistral-7b": ModelShape("llava-next-mistral-7b", LLMShape(32, 4096, 14336, 32, 8, 32064),
                                        _CLIP_L_336, "mlp2x_gelu", 576 + 48 * 48 + 48, tower_crops=5),
    "qwen2.5-vl-7b": ModelShape("qwen2.5-vl-7b", LLMShape(28, 3584, 18944, 28, 4, 152064),
                                VisionShape(32, 1280, 3420, 16, 448, 14), "patch_merger", 256),
    "gemma-3-4b": ModelShape("gemma-3-4b", LLMShape(34, 2560, 10240, 8, 4, 262208, 256, True),
                             VisionShape(27, 1152, 4304, 16, 896, 14), "linear", 256),
    "mistral-7b": ModelShape("mistral-7b", _MISTRAL_7B),
    "llama-7b": ModelShape("llama-7b", _LLAMA_7B),
    "llama-2-7b": ModelShape("llama-2-7b", _LLAMA_7B),
    "llama-3.1-8b": ModelShape("llama-3.1-8b", LLMShape(32, 4096, 14336, 32, 8, 128256)),
    # CPU shapes: the kit's tiny builder (TinyModelConfig defaults) and the mid smoke model of NOTES.md
    "tiny": _llava("tiny", LLMShape(2, 64, 128, 4, 2, 32064), VisionShape(2, 32, 128, 2, 56, 14)),
    "mid": _llava("mid", LLMShape(4, 512, 2048, 8, 4, 32000), VisionShape(4, 256, 1024, 4, 224, 14)),
}
ALIASES = {"microsoft/llava-med-v1.5-mistral-7b": "llava-med-v1.5", "meta-llama/llama-2-7b-hf": "llama-2-7b",
           "meta-llama/llama-3.1-8b": "llama-3.1-8b", "mistralai/mistral-7b-instruct-v0.2": "mistral-7b",
           "huggyllama/llama-7b": "llama-7b", "mistral-7b-instruct-v0.2": "mistral-7b", "llama-2-7b-hf": "llama-2-7b",
           "llama-3.1-8b-instruct": "llama-3.1-8b", "meta-llama-3.1-8b": "llama-3.1-8b",
           "llava-hf/llava-1.5-7b-hf": "llava-1.5-7b", "llava-hf/llava-v1.6-mistral-7b-hf": "llava-next-mistral-7b",
           "qwen/qwen2.5-vl-7b-instruct": "qwen2.5-vl-7b", "google/gemma-3-4b-it": "gemma-3-4b"}


def preset(name: str) -> ModelShape:
    key = ALIASES.get(name.lower(), name.lower())
    if key not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[key]
