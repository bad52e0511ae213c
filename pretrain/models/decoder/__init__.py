"""The decoder every Qwen family shares, on megatron-core: GQA attention (SDPA / flash-attn), RoPE, RMSNorm
pre-norm, SwiGLU MLP or routed experts (+ shared expert), with the switches of ``pretrain.models.config``
(QKV bias, QK-norm, head width, top-k normalisation, load-balancing scope) deciding the variant."""
