"""The one online-softmax helper every Triton kernel here uses (Milakov & Gimelshein, 2018).

Streaming over the vocabulary in blocks keeps a running max `m` and a running sum `s` of exp(x - m), so a
row of any length is read once and nothing of size V is stored.
"""

import triton
import triton.language as tl


@triton.jit
def online_softmax_update(m, s, x):
    """Fold a block `x` (fp32; lanes that must not count are -inf) into the running (max, sum-exp).

    Start from m = -inf, s = 0. The first block must hold at least one finite value: then
    exp(m_old - m_new) is exp(-inf) = 0 and never inf - inf.
    """
    m_new = tl.maximum(m, tl.max(x, axis=0))
    s_new = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
    return m_new, s_new
