"""Qwen2 dense and Qwen2-MoE on megatron-core."""
