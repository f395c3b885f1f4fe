"""Per-GPU memory estimate (GiB) for training a VLM with hf_vitask under DDP, ZeRO-2 and ZeRO-3.

    python benchmarks/memory_estimate.py                     # N = 2 and 8 GPUs, LoRA r=16, 1024 tokens
    python benchmarks/memory_estimate.py --gpus 4 --lora-r 64 --seq-len 2048 --batch-per-gpu 2

Estimate from shapes, not a measurement. Parameter counts come from shape tables of the two
checkpoints' published configs (Qwen2-VL-2B-Instruct, Llama-3.2-11B-Vision-Instruct), not from
advertised totals; the script prints its totals next to the advertised sizes as a check. For each
base it estimates LoRA on a bf16 base, full fine-tuning in bf16 mixed precision with AdamW, and
QLoRA (DDP only), and splits the memory per GPU into weights, gradients + optimizer state and
activations. Standard library only, so it runs anywhere in well under a second.

Assumptions (the main ones are also printed under the table):

* Trainable parameter: 16 bytes (ZeRO paper's mixed precision: 2 B bf16 weight, 2 B bf16 grad,
  12 B fp32 master + Adam m + v). torch-AMP DDP (fp32 weight and grad, 8 B Adam) also totals 16 B.
  DDP's gradient buckets (another 2-4 B/trainable param unless ``gradient_as_bucket_view``),
  DeepSpeed's communication buckets, the CUDA context (~0.5-1 GiB) and allocator fragmentation
  are not counted.
* Sharding over N GPUs: DDP shards nothing; ZeRO-2 shards grads and optimizer state; ZeRO-3 also
  shards the weights (frozen ones too) and adds a gather working set of 2 B x max(largest single
  matrix, 2 decoder layers): the module being computed plus the one prefetched.
* QLoRA as the package configures it (``bnb_4bit_config``): NF4 with double quantisation on the
  decoder's linear weights = 0.5 B + 1/64 B (one 8-bit absmax per 64 weights) + 4/(64*256) B (one
  fp32 constant per 256 blocks) ~= 0.516 B/param; everything else (vision tower, projector,
  embeddings, lm_head, norms, biases) is upcast to fp32 by ``peft.prepare_model_for_kbit_training``.
  DDP only: the package leaves ``bnb_4bit_quant_storage`` at uint8 and loads a full copy per rank,
  so ZeRO-3 does not shard these 4-bit weights (PEFT's ZeRO-3 QLoRA recipe needs the storage dtype
  set to the float dtype).
* Activations, gradient checkpointing on, per sequence: a VITask stage-2 step stacks ``passes`` = 3
  language-model passes (no-EP, EP, CRT negative) of ``seq_len`` tokens into one forward. Checkpoints:
  2 B x hidden per token per decoder layer; one layer recomputed in backward: 34 B x hidden per
  token (Korthikanti et al. 2022, eq. 1, with flash/SDPA attention dropping the 5*a*s/h score term);
  logits only at response positions: 16 tokens x vocab x 4 B (fp32) per pass. The vision tower
  stores activations only when it trains (full fine-tuning), once per step, by the same formula,
  for one image (Qwen2-VL: 448x448 = 1024 patches -> 256 of the LM tokens; Llama-3.2-Vision: 4 tiles
  x 1601 patches, cross-attended, so none of them are LM tokens).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

GIB = 2**30
STRATEGIES = ("DDP", "ZeRO-2", "ZeRO-3")
METHODS = ("LoRA", "full", "QLoRA")

# Bytes per trainable parameter (mixed precision AdamW): working weight, gradient, optimizer state.
TRAINABLE_WEIGHT_B, TRAINABLE_GRAD_B, OPTIMIZER_B = 2, 2, 12
# QLoRA's adapters and connector are fp32 (peft's upcast): fp32 weight, fp32 grad, Adam m + v.
QLORA_TRAINABLE = (4, 4, 8)
BF16_B, FP32_B = 2, 4
NF4_B = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit code + 8-bit absmax per 64 + fp32 per 256 blocks
LAYER_ACTIVATION_B = 34  # bytes per token per unit of hidden, one transformer layer (Korthikanti eq. 1)
RESPONSE_TOKENS = 16
EXEMPLAR_TSM_DIM = 768  # the exemplar connector's input: a ViT-B-sized TSM feature


def linear(n_in: int, n_out: int, bias: bool = False) -> int:
    return n_in * n_out + (n_out if bias else 0)


def layernorm(d: int) -> int:
    return 2 * d  # weight + bias (RMSNorm: d)


# ---------------------------------------------------------------- shape tables


@dataclass(frozen=True)
class TextDecoder:
    """A Llama-style decoder: GQA attention + SwiGLU MLP, RMSNorms, optional cross-attention layers."""

    vocab: int
    embed_rows: int  # embedding rows (Mllama adds 8 image tokens to the 128256 vocab)
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    qkv_bias: bool
    tied_embeddings: bool
    cross_attn_layers: tuple[int, ...] = ()

    @property
    def kv_dim(self) -> int:
        return self.hidden // self.heads * self.kv_heads

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


@dataclass(frozen=True)
class QwenVision:
    """Qwen2-VL's ViT: Conv3d patch embed, pre-norm blocks (fused qkv), 2x2 patch merger MLP."""

    depth: int
    embed_dim: int
    mlp_ratio: int
    patch: int
    temporal_patch: int
    merge: int  # spatial merge size: merge**2 patches -> one LM token
    out_dim: int  # merger output = LM hidden
    tokens: int  # patches per image for the activation term (448x448: 32x32 patches -> 256 LM tokens)


@dataclass(frozen=True)
class MllamaVision:
    """Llama-3.2-Vision's ViT: tiled 560px images, 32 local + 8 gated global layers, 7680-d output."""

    hidden: int
    local_layers: int
    global_layers: int
    intermediate: int
    patch: int
    image: int
    max_tiles: int
    aspect_ratios: int  # max_aspect_ratio_id + 1 rows in the tile embeddings (8 ratios + padding)
    intermediate_outputs: int  # intermediate layers concatenated to the output (3, 7, 15, 23, 30)
    out_dim: int  # projector output = LM hidden

    @property
    def patches(self) -> int:
        return (self.image // self.patch) ** 2 + 1  # + class token

    @property
    def tokens(self) -> int:
        return self.max_tiles * self.patches

    @property
    def depth(self) -> int:
        return self.local_layers + self.global_layers


@dataclass(frozen=True)
class Base:
    """A base checkpoint: its shape tables and the size its model card advertises."""

    name: str
    advertised: float
    text: TextDecoder
    vision: QwenVision | MllamaVision


QWEN2_VL_2B = Base(
    name="Qwen2-VL-2B-Instruct",
    advertised=2.2e9,
    text=TextDecoder(
        vocab=151936,
        embed_rows=151936,
        hidden=1536,
        intermediate=8960,
        layers=28,
        heads=12,
        kv_heads=2,
        qkv_bias=True,
        tied_embeddings=True,
    ),
    vision=QwenVision(
        depth=32, embed_dim=1280, mlp_ratio=4, patch=14, temporal_patch=2, merge=2, out_dim=1536, tokens=1024
    ),
)

LLAMA32_11B_VISION = Base(
    name="Llama-3.2-11B-Vision-Instruct",
    advertised=10.6e9,
    text=TextDecoder(
        vocab=128256,
        embed_rows=128256 + 8,
        hidden=4096,
        intermediate=14336,
        layers=40,
        heads=32,
        kv_heads=8,
        qkv_bias=False,
        tied_embeddings=False,
        cross_attn_layers=(3, 8, 13, 18, 23, 28, 33, 38),
    ),
    vision=MllamaVision(
        hidden=1280,
        local_layers=32,
        global_layers=8,
        intermediate=5120,
        patch=14,
        image=560,
        max_tiles=4,
        aspect_ratios=9,
        intermediate_outputs=5,
        out_dim=4096,
    ),
)

BASES = (QWEN2_VL_2B, LLAMA32_11B_VISION)


# ---------------------------------------------------------------- parameter counts


def decoder_linear_shapes(t: TextDecoder) -> list[tuple[int, int]]:
    """(in, out) of one decoder layer's q, k, v, o, gate, up, down: LoRA's targets, QLoRA's 4-bit weights.

    Mllama's cross-attention layers have the same shapes (k/v read the 4096-d projected image states)."""
    h, kv, i = t.hidden, t.kv_dim, t.intermediate
    return [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]


def decoder_layer_params(t: TextDecoder, cross: bool = False) -> int:
    """Weights + biases + norms of one layer; cross layers add q/k RMSNorms and two tanh gates."""
    n = sum(a * b for a, b in decoder_linear_shapes(t))
    n += (t.hidden + 2 * t.kv_dim) if t.qkv_bias else 0
    n += 2 * t.hidden  # input + post-attention RMSNorm
    if cross:
        n += 2 * t.head_dim + 2  # q_norm, k_norm, attn gate, mlp gate
    return n


def vision_params(v: QwenVision | MllamaVision) -> int:
    """The vision tower without its projector to the LM."""
    if isinstance(v, QwenVision):
        e = v.embed_dim
        patch_embed = 3 * v.temporal_patch * v.patch**2 * e  # Conv3d, no bias
        block = 2 * layernorm(e) + linear(e, 3 * e, True) + linear(e, e, True)
        block += linear(e, e * v.mlp_ratio, True) + linear(e * v.mlp_ratio, e, True)
        return patch_embed + v.depth * block
    e = v.hidden
    embeddings = 3 * v.patch**2 * e + e  # Conv2d (no bias) + class embedding
    embeddings += v.patches * e + 1  # gated positional embedding
    embeddings += v.aspect_ratios * v.max_tiles * v.patches * e  # its per-aspect-ratio tile embedding
    embeddings += 2 * (v.aspect_ratios * v.max_tiles * e + 1)  # pre/post tile positional embeddings
    mlp = linear(e, v.intermediate, True) + linear(v.intermediate, e, True)
    layer = 4 * linear(e, e) + mlp + 2 * layernorm(e)  # q, k, v, o without bias
    return embeddings + 2 * layernorm(e) + v.depth * layer + 2 * v.global_layers  # global layers' gates


def projector_params(v: QwenVision | MllamaVision) -> int:
    """Qwen2-VL: LN + 2-layer MLP on 2x2 merged patches; Mllama: one Linear from the 7680-d stack."""
    if isinstance(v, QwenVision):
        merged = v.embed_dim * v.merge**2
        return layernorm(v.embed_dim) + linear(merged, merged, True) + linear(merged, v.out_dim, True)
    return linear(v.hidden * (1 + v.intermediate_outputs), v.out_dim, True)


def param_breakdown(b: Base) -> dict[str, int]:
    """Parameter count by part; ``decoder linears``: the part of ``decoder layers`` that QLoRA quantises."""
    t = b.text
    cross = set(t.cross_attn_layers)
    return {
        "vision tower": vision_params(b.vision),
        "projector": projector_params(b.vision),
        "embeddings": t.embed_rows * t.hidden,
        "decoder layers": sum(decoder_layer_params(t, i in cross) for i in range(t.layers)),
        "final norm": t.hidden,
        "lm_head": 0 if t.tied_embeddings else t.vocab * t.hidden,
        "decoder linears": t.layers * sum(a * c for a, c in decoder_linear_shapes(t)),
    }


def total_params(b: Base) -> int:
    parts = param_breakdown(b)
    return sum(v for k, v in parts.items() if k != "decoder linears")


def connector_params(llm_hidden: int, tsm_dim: int = EXEMPLAR_TSM_DIM) -> int:
    """The exemplar connector: LayerNorm(tsm) -> Linear(tsm, h) -> GELU -> Linear(h, h); always trainable."""
    return layernorm(tsm_dim) + linear(tsm_dim, llm_hidden, True) + linear(llm_hidden, llm_hidden, True)


def lora_params(t: TextDecoder, r: int) -> int:
    """r * (in + out) per targeted decoder linear (A: r x in, B: out x r), every layer."""
    return t.layers * sum(r * (a + c) for a, c in decoder_linear_shapes(t))


# ---------------------------------------------------------------- memory


@dataclass(frozen=True)
class Estimate:
    """Bytes per GPU by component for one (base, method, strategy, GPUs) combination."""

    base: str
    method: str
    strategy: str
    gpus: int
    frozen_weights: float
    trainable_weights: float
    gather_buffer: float  # ZeRO-3: gathered full parameters of the current + prefetched module
    grads: float
    optimizer: float
    act_checkpoints: float
    act_layer: float
    act_vision: float
    act_logits: float

    @property
    def weights(self) -> float:
        return self.frozen_weights + self.trainable_weights + self.gather_buffer

    @property
    def grads_optimizer(self) -> float:
        return self.grads + self.optimizer

    @property
    def activations(self) -> float:
        return self.act_checkpoints + self.act_layer + self.act_vision + self.act_logits

    @property
    def total(self) -> float:
        return self.weights + self.grads_optimizer + self.activations


def activation_bytes(b: Base, vision_trains: bool, seq_len: int, batch: int, passes: int) -> dict[str, float]:
    """Activation memory with gradient checkpointing: what is alive at the peak of backward."""
    t, v = b.text, b.vision
    tokens = batch * passes * seq_len
    vision_hidden = v.embed_dim if isinstance(v, QwenVision) else v.hidden
    vision_tokens = batch * v.tokens
    return {
        "act_checkpoints": tokens * t.hidden * BF16_B * t.layers,
        "act_layer": LAYER_ACTIVATION_B * tokens * t.hidden,
        "act_vision": (
            vision_tokens * vision_hidden * (BF16_B * v.depth + LAYER_ACTIVATION_B) if vision_trains else 0
        ),
        "act_logits": batch * passes * RESPONSE_TOKENS * t.vocab * FP32_B,
    }


def zero3_gather_bytes(b: Base) -> float:
    """ZeRO-3 gathers each module's full weights to run it: the largest module and the next one in flight."""
    t = b.text
    largest_layer = decoder_layer_params(t, cross=bool(t.cross_attn_layers))
    return BF16_B * max(t.embed_rows * t.hidden, 2 * largest_layer)


def estimate(
    b: Base, method: str, strategy: str, gpus: int, lora_r: int, seq_len: int, batch: int, passes: int = 3
) -> Estimate:
    """Per-GPU bytes for one combination (see the module docstring for the byte counts)."""
    if method == "QLoRA" and strategy != "DDP":
        raise ValueError("QLoRA is estimated under DDP only: ZeRO-3 does not shard the package's 4-bit base")
    parts = param_breakdown(b)
    total = total_params(b)
    connector = connector_params(b.text.hidden)
    w_b, g_b, o_b = TRAINABLE_WEIGHT_B, TRAINABLE_GRAD_B, OPTIMIZER_B
    if method == "full":
        trainable, frozen = total + connector, 0.0
    elif method == "LoRA":
        trainable, frozen = lora_params(b.text, lora_r) + connector, BF16_B * total
    else:  # QLoRA: 4-bit decoder linears, the rest upcast to fp32
        quantised = parts["decoder linears"]
        trainable = lora_params(b.text, lora_r) + connector
        frozen = NF4_B * quantised + FP32_B * (total - quantised)
        w_b, g_b, o_b = QLORA_TRAINABLE
    shard_states = 1 if strategy == "DDP" else gpus
    shard_weights = gpus if strategy == "ZeRO-3" else 1
    return Estimate(
        base=b.name,
        method=method,
        strategy=strategy,
        gpus=gpus,
        frozen_weights=frozen / shard_weights,
        trainable_weights=w_b * trainable / shard_weights,
        gather_buffer=zero3_gather_bytes(b) if strategy == "ZeRO-3" else 0.0,
        grads=g_b * trainable / shard_states,
        optimizer=o_b * trainable / shard_states,
        **activation_bytes(b, method == "full", seq_len, batch, passes),
    )


def combinations(gpus: list[int]) -> list[tuple[Base, str, str, int]]:
    """Every (base, method, strategy, GPUs) row: LoRA and full under all three strategies, QLoRA under DDP."""
    rows = []
    for b in BASES:
        for method in METHODS:
            for strategy in STRATEGIES if method != "QLoRA" else ("DDP",):
                rows.extend((b, method, strategy, n) for n in gpus)
    return rows


def estimates(
    gpus: list[int], lora_r: int = 16, seq_len: int = 1024, batch: int = 1, passes: int = 3
) -> list[Estimate]:
    return [estimate(b, m, s, n, lora_r, seq_len, batch, passes) for b, m, s, n in combinations(gpus)]


# ---------------------------------------------------------------- report


def gib(x: float) -> str:
    return f"{x / GIB:.2f}"


def param_lines(lora_r: int) -> list[str]:
    """Counted totals next to the advertised sizes, and the trainable counts."""
    lines = []
    for b in BASES:
        parts = param_breakdown(b)
        total = total_params(b)
        shown = " + ".join(f"{k} {v / 1e9:.3f}B" for k, v in parts.items() if k != "decoder linears")
        shown += " (tied to embeddings)" if b.text.tied_embeddings else ""
        off = total / b.advertised - 1
        verdict = "OK" if abs(off) < 0.10 else "MISMATCH"
        lines.append(
            f"- {b.name}: {shown} = **{total / 1e9:.3f}B** "
            f"(advertised ~{b.advertised / 1e9:.1f}B, {off:+.1%}: {verdict})"
        )
        connector = connector_params(b.text.hidden)
        lines.append(
            f"  trainable: LoRA r={lora_r} {lora_params(b.text, lora_r) / 1e6:.1f}M "
            f"+ exemplar connector {connector / 1e6:.1f}M; full {(total + connector) / 1e9:.3f}B; "
            f"QLoRA 4-bit share {parts['decoder linears'] / total:.0%} of the base"
        )
    return lines


def table(rows: list[Estimate]) -> list[str]:
    lines = [
        "| base | method | strategy | GPUs | weights | grads+optimizer | activations | total GiB |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {e.base} | {e.method} | {e.strategy} | {e.gpus} | {gib(e.weights)} "
        f"| {gib(e.grads_optimizer)} | {gib(e.activations)} | {gib(e.total)} |"
        for e in rows
    ]
    return lines


def component_table(rows: list[Estimate]) -> list[str]:
    """Where the memory goes: every term of every row, GiB."""
    cols = (
        "frozen_weights",
        "trainable_weights",
        "gather_buffer",
        "grads",
        "optimizer",
        "act_checkpoints",
        "act_layer",
        "act_vision",
        "act_logits",
    )
    lines = [
        "| base | method | strategy | GPUs | " + " | ".join(cols) + " |",
        "|---|---|---|---:|" + "---:|" * len(cols),
    ]
    lines += [
        f"| {e.base} | {e.method} | {e.strategy} | {e.gpus} | "
        + " | ".join(gib(getattr(e, c)) for c in cols)
        + " |"
        for e in rows
    ]
    return lines


def report(gpus: list[int], lora_r: int, seq_len: int, batch: int, passes: int) -> str:
    rows = estimates(gpus, lora_r, seq_len, batch, passes)
    lines = [
        "Estimate from shapes, not a measurement",
        "",
        f"Per GPU, GiB. LoRA r={lora_r} on the decoder's q,k,v,o,gate,up,down + exemplar connector; "
        f"{seq_len} tokens x {passes} stacked passes x {batch} sequence(s) per GPU; "
        "gradient checkpointing on.",
        "",
        "Parameters counted from shapes:",
        *param_lines(lora_r),
        "",
        *table(rows),
        "",
        "QLoRA: DDP only; ZeRO-3 does not shard the package's bnb 4-bit weights (quant storage uint8, "
        "one full copy per rank).",
        "Not counted: CUDA context (~0.5-1 GiB), DDP/DeepSpeed communication buckets, "
        "allocator fragmentation, the frozen TSM.",
        "",
        "Components (GiB):",
        "",
        *component_table(rows),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, nargs="+", default=[2, 8], help="GPU counts (default: 2 8)")
    parser.add_argument("--lora-r", type=int, default=16, help="LoRA rank (default 16)")
    parser.add_argument(
        "--seq-len", type=int, default=1024, help="LM tokens per sequence, image + text (default 1024)"
    )
    parser.add_argument("--batch-per-gpu", type=int, default=1, help="sequences per GPU (default 1)")
    parser.add_argument(
        "--passes",
        type=int,
        default=3,
        help="LM passes stacked per sequence: 3 VITask stage 2, 2 stage 1, 1 plain SFT",
    )
    args = parser.parse_args(argv)
    print(report(args.gpus, args.lora_r, args.seq_len, args.batch_per_gpu, args.passes))


if __name__ == "__main__":
    main()
