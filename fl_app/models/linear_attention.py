"""Causal linear attention (Katharopoulos et al., 2020), the fast-transformers formulation.

Softmax attention ``softmax(q·kᵀ)`` is replaced by the kernel ``φ(q)·φ(k)ᵀ`` with the feature map
``φ(x) = elu(x) + 1``. For a causal mask the output at step ``i`` is::

    out_i = φ(q_i) S_i / (φ(q_i) · z_i + eps),   S_i = Σ_{j≤i} φ(k_j) v_jᵀ  (D×M),   z_i = Σ_{j≤i} φ(k_j)  (D)

which gives two equivalent modes:

* **parallel** (training, prefill): :func:`causal_linear_attention`, either pytorch-fast-transformers'
  C++/CUDA ``causal_dot_product`` (the optional ``fast`` extra) or a pure-PyTorch chunked form: inside
  a chunk of ``C`` steps a masked ``C×C`` product, across chunks a cumulative sum of per-chunk states
  (memory O(T·C + T/C·D·M) instead of O(T·D·M));
* **recurrent** (sampling): :func:`linear_attention_step` updates the constant-size state
  ``(S, z)`` per head with one token, O(D·M) per token whatever the position.

Shapes use ``B`` batch, ``H`` heads, ``T`` steps, ``D`` key/query and ``M`` value dimension per head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "causal_linear_attention",
    "elu_feature_map",
    "fast_available",
    "linear_attention_decode",
    "linear_attention_state",
    "linear_attention_step",
]

EPS = 1e-6
"""Added to the normaliser, as fast-transformers does."""

try:  # the optional `fast` extra: pytorch-fast-transformers' compiled kernels
    from fast_transformers.causal_product import causal_dot_product as _fast_causal_dot_product
    from fast_transformers.causal_product import causal_dot_product_cuda as _fast_cuda_kernel
except ImportError:  # pragma: no cover - depends on the install
    _fast_causal_dot_product = None
    _fast_cuda_kernel = None


def fast_available(device: torch.device | str = "cpu") -> bool:
    """True when pytorch-fast-transformers' causal product kernel exists for ``device``'s type."""
    if _fast_causal_dot_product is None:
        return False
    if torch.device(device).type == "cuda":
        return _fast_cuda_kernel is not None
    return torch.device(device).type == "cpu"


def elu_feature_map(x: torch.Tensor) -> torch.Tensor:
    """φ(x) = elu(x) + 1 (positive), elementwise; any shape."""
    return F.elu(x) + 1.0


def _causal_product_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk: int) -> tuple:
    """Chunked causal products of feature-mapped inputs.

    Args:
        q, k: (B, H, T, D) feature-mapped queries / keys; v: (B, H, T, M).
        chunk: chunk length C.

    Returns:
        ``(num, den)``: num (B, H, T, M) = Σ_{j≤i} (q_i·k_j) v_j, den (B, H, T) = Σ_{j≤i} q_i·k_j.
    """
    b, h, t, d = q.shape
    m = v.shape[-1]
    c = min(chunk, t)
    pad = (-t) % c
    if pad:  # padded keys are 0, so they contribute nothing; padded queries are cut off below
        q = F.pad(q, (0, 0, 0, pad))
        k = F.pad(k, (0, 0, 0, pad))
        v = F.pad(v, (0, 0, 0, pad))
    n = (t + pad) // c
    qc = q.reshape(b, h, n, c, d)
    kc = k.reshape(b, h, n, c, d)
    vc = v.reshape(b, h, n, c, m)
    # state carried into each chunk from the chunks before it (exclusive cumulative sum)
    kv = torch.einsum("bhncd,bhncm->bhndm", kc, vc)  # (B, H, n, D, M)
    ks = kc.sum(3)  # (B, H, n, D)
    s_prev = torch.cat([torch.zeros_like(kv[:, :, :1]), kv[:, :, :-1].cumsum(2)], dim=2)
    z_prev = torch.cat([torch.zeros_like(ks[:, :, :1]), ks[:, :, :-1].cumsum(2)], dim=2)
    # within-chunk part: masked C×C scores
    scores = qc @ kc.transpose(-1, -2)  # (B, H, n, C, C)
    mask = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~mask, 0.0)
    num = torch.einsum("bhncd,bhndm->bhncm", qc, s_prev) + scores @ vc
    den = torch.einsum("bhncd,bhnd->bhnc", qc, z_prev) + scores.sum(-1)
    return num.reshape(b, h, n * c, m)[:, :, :t], den.reshape(b, h, n * c)[:, :, :t]


def causal_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    impl: str = "auto",
    chunk: int = 64,
    eps: float = EPS,
) -> torch.Tensor:
    """Parallel causal linear attention.

    Args:
        q, k: (B, H, T, D) raw queries / keys (the feature map is applied here); v: (B, H, T, M).
        impl: ``"fast"`` (pytorch-fast-transformers; raises if absent), ``"torch"``, or ``"auto"``
            (fast when installed for the device and the dtype is float32, else torch).
        chunk: chunk length of the torch implementation.
        eps: normaliser offset.

    Returns:
        (B, H, T, M).
    """
    qf = elu_feature_map(q)
    kf = elu_feature_map(k)
    use_fast = impl == "fast" or (impl == "auto" and q.dtype == torch.float32 and fast_available(q.device))
    if use_fast:
        if not fast_available(q.device):
            raise RuntimeError(
                "linear_impl='fast' needs pytorch-fast-transformers (pip install 'synthbrain[fast]')"
            )
        num = _fast_causal_dot_product(qf.contiguous(), kf.contiguous(), v.contiguous())
        den = torch.einsum("bhtd,bhtd->bht", qf, kf.cumsum(2))
    elif impl in ("torch", "auto"):
        num, den = _causal_product_torch(qf, kf, v, chunk)
    else:
        raise ValueError(f"unknown linear attention impl {impl!r}")
    return num / (den + eps).unsqueeze(-1)


def linear_attention_state(
    batch: int, heads: int, d: int, m: int, device: torch.device | str, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero recurrent state ``(S (B, H, D, M), z (B, H, D))``."""
    return (
        torch.zeros(batch, heads, d, m, device=device, dtype=dtype),
        torch.zeros(batch, heads, d, device=device, dtype=dtype),
    )


def linear_attention_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: tuple[torch.Tensor, torch.Tensor],
    eps: float = EPS,
) -> torch.Tensor:
    """Recurrent mode: absorb T new steps into ``state`` (in place) and return their outputs.

    Args:
        q, k: (B, H, T, D) raw queries / keys; v: (B, H, T, M). T is usually 1 (one new token); T > 1
            (a prefill) uses the parallel form on top of the carried state.
        state: ``(S (B, H, D, M), z (B, H, D))`` from :func:`linear_attention_state`, updated in place.
        eps: normaliser offset.

    Returns:
        (B, H, T, M), identical (up to rounding) to the matching rows of
        :func:`causal_linear_attention` over the whole sequence.
    """
    s, z = state
    qf = elu_feature_map(q)
    kf = elu_feature_map(k)
    if q.shape[2] == 1:
        s.add_(kf.transpose(-1, -2) @ v)  # (B, H, D, 1) @ (B, H, 1, M)
        z.add_(kf[:, :, 0])
        num = qf @ s  # (B, H, 1, M)
        den = (qf @ z.unsqueeze(-1)).squeeze(-1)  # (B, H, 1)
        return num / (den + eps).unsqueeze(-1)
    num, den = _causal_product_torch(qf, kf, v, chunk=q.shape[2])
    num = num + qf @ s
    den = den + (qf @ z.unsqueeze(-1)).squeeze(-1)
    s.add_(kf.transpose(-1, -2) @ v)
    z.add_(kf.sum(2))
    return num / (den + eps).unsqueeze(-1)


def linear_attention_decode(
    qf: torch.Tensor,
    kf: torch.Tensor,
    v: torch.Tensor,
    state: tuple[torch.Tensor, torch.Tensor],
    eps: float = EPS,
) -> torch.Tensor:
    """Lean recurrent step for one token with *feature-mapped* inputs (the sampler's hot path).

    Args:
        qf, kf: (B, H, D) φ(q), φ(k); v: (B, H, M).
        state: ``(S (B, H, D, M), z (B, H, D))``, updated in place.

    Returns:
        (B, H, M), the same as :func:`linear_attention_step` on the raw q, k with T = 1.
    """
    s, z = state
    b, h, d = qf.shape
    m = v.shape[-1]
    s3 = s.view(b * h, d, m)
    s3.baddbmm_(kf.reshape(b * h, d, 1), v.reshape(b * h, 1, m))
    z.add_(kf)
    q3 = qf.reshape(b * h, 1, d)
    num = torch.bmm(q3, s3)  # (BH, 1, M)
    den = torch.bmm(q3, z.view(b * h, d, 1))  # (BH, 1, 1)
    return (num / (den + eps)).view(b, h, m)
