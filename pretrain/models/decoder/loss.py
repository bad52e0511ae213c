"""``trainer.cross_entropy=chunked``: output layer + cross-entropy over a few tokens at a time.

The plain path materialises the logits [tokens x vocab] in the compute dtype, and megatron-core's
vocab-parallel cross-entropy keeps an fp32 copy of them (its softmax) for backward: at Qwen2's 151,936-word
vocabulary and 4,096 tokens that is 1.2 GB of bf16 logits plus 2.5 GB of fp32 kept per microbatch. Here
each chunk of ``chunk`` tokens gets its logits, their fp32 log-sum-exp and the target logit, and is freed;
backward recomputes each chunk's logits (one more output-layer GEMM: ~2·hidden·vocab FLOPs per token) and
turns them into the hidden and weight gradients. Kept for backward: the hidden states (which the output
layer keeps anyway), the weight, and one fp32 number per token.
"""
from __future__ import annotations

import torch
from megatron.core.models.gpt import GPTModel


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, chunk: int):
        # hidden [n, h], weight [vocab, h], target [n] -> per-token loss [n] (fp32)
        lse = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        picked = torch.empty_like(lse)
        for start in range(0, hidden.shape[0], chunk):
            rows = slice(start, start + chunk)
            logits = (hidden[rows] @ weight.t()).float()  # the plain path's GEMM, then fp32 as megatron's CE
            lse[rows] = torch.logsumexp(logits, dim=-1)
            picked[rows] = logits.gather(1, target[rows, None]).squeeze(1)
            del logits
        ctx.save_for_backward(hidden, weight, target, lse)
        ctx.chunk = chunk
        return lse - picked

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        hidden, weight, target, lse = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden)
        # Summed over chunks in fp32, cast once: the same rounding as one full-size GEMM's output.
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        grad_loss = grad_loss.float()
        for start in range(0, hidden.shape[0], ctx.chunk):
            rows = slice(start, start + ctx.chunk)
            probs = ((hidden[rows] @ weight.t()).float() - lse[rows, None]).exp_()  # softmax
            probs.scatter_add_(1, target[rows, None], torch.full_like(probs[:, :1], -1.0))  # - one-hot
            grad_logits = (probs * grad_loss[rows, None]).to(hidden.dtype)
            del probs
            grad_hidden[rows] = grad_logits @ weight
            grad_weight += grad_logits.t() @ hidden[rows]
        return grad_hidden, grad_weight.to(weight.dtype), None, None


def chunked_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                                 chunk: int) -> torch.Tensor:
    """Per-token cross-entropy of ``hidden @ weight.T`` against ``labels``, ``chunk`` tokens at a time.

    ``hidden`` is megatron's ``[seq, batch, h]``, ``labels`` ``[batch, seq]``; returns ``[batch, seq]`` fp32,
    as ``GPTModel.compute_language_model_loss`` does.
    """
    s, b, h = hidden.shape
    flat = hidden.transpose(0, 1).reshape(b * s, h)  # batch-major, as labels
    loss = _ChunkedLinearCrossEntropy.apply(flat, weight, labels.reshape(-1), chunk)
    return loss.view(b, s)


class DecoderGPTModel(GPTModel):
    """megatron-core's ``GPTModel`` whose loss can skip the full logits (``cross_entropy_chunk`` tokens > 0).

    Only the training/eval loss path (labels given, no multi-token prediction, no inference context, no
    tensor parallelism) changes; everything else is ``GPTModel._postprocess``.
    """

    def __init__(self, *args, cross_entropy_chunk: int = 0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.cross_entropy_chunk = cross_entropy_chunk

    def _postprocess(self, hidden_states, input_ids, position_ids, labels, *args, **kwargs):
        plain = (not self.cross_entropy_chunk or labels is None or kwargs.get("mtp_in_postprocess")
                 or kwargs.get("inference_context") is not None or self.output_layer.sequence_parallel
                 or self.config.tensor_model_parallel_size > 1)
        if plain:
            return super()._postprocess(hidden_states, input_ids, position_ids, labels, *args, **kwargs)
        weight = (self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights
                  else self.output_layer.weight)
        return chunked_linear_cross_entropy(hidden_states, weight, labels, self.cross_entropy_chunk)
