"""Parameter and FLOP counts of the decoder, from its shape alone (pure, no torch).

Conventions (logged with every run as ``flops_convention``):

* ``N`` (non-embedding parameters) follows MiniCPM:
  ``N = L·(2·d·n_q·d_h + 2·d·n_kv·d_h + 3·d·d_ff + 2·d) + d`` (Q, O, K, V, SwiGLU, two norms per
  block, final norm). It reproduces the paper's 2,442,057,984 / 1,247,442,432 / 9,426,240.
* FLOPs per token (training: forward + backward) count every matmul exactly:
  ``6·(matrix params) + 6·V·d`` for the output head (tied or not, the head is a matmul) plus
  causal attention ``6·L·T·n_q·d_h`` (QKᵀ and AV, forward 2·2·T/2 each, backward twice that).
  Norms, RoPE, softmax and the embedding lookup are not counted. At micro scale the head and
  attention terms are a large share, so the 6N shortcut would shift fitted exponents.
"""

from __future__ import annotations

from dataclasses import dataclass

FLOPS_CONVENTION = "6*matmul_params + 6*V*d (head) + 6*L*T*n_q*d_h (causal attention)"


@dataclass(frozen=True, kw_only=True)
class Shape:
    """The numbers that fix the decoder's size."""

    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_ff: int
    vocab_size: int
    tie_embeddings: bool = True


def d_ff_for(d_model: int, ffn_mult: float = 2.5) -> int:
    """MiniCPM's shape rule for the SwiGLU width."""
    return int(round(ffn_mult * d_model))


def matrix_params(s: Shape) -> int:
    """Parameters of the hidden 2-D matrices (attention and MLP), all layers."""
    attn = 2 * s.d_model * s.n_heads * s.d_head + 2 * s.d_model * s.n_kv_heads * s.d_head
    mlp = 3 * s.d_model * s.d_ff
    return s.n_layers * (attn + mlp)


def non_embedding_params(s: Shape) -> int:
    """MiniCPM's N: hidden matrices plus RMSNorm gains."""
    return matrix_params(s) + s.n_layers * 2 * s.d_model + s.d_model


def embedding_params(s: Shape) -> int:
    """Input embedding plus, when untied, the output head."""
    return s.vocab_size * s.d_model * (1 if s.tie_embeddings else 2)


def flops_per_token(s: Shape, seq_len: int) -> int:
    """Training FLOPs (forward + backward) per token, see the module docstring."""
    head = 6 * s.vocab_size * s.d_model
    attn = 6 * s.n_layers * seq_len * s.n_heads * s.d_head
    return 6 * matrix_params(s) + head + attn
