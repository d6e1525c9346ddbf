"""Conditional decoder-only transformer prior over VQ-VAE code grids (nanoGPT-style, one file).

A code grid (cx, cy, cz) from the VQ-VAE is flattened to a sequence of ``N = cx·cy·cz`` codes in a
fixed order (``raster``: C order, z fastest; or ``random``: a seeded permutation) and modelled
autoregressively. Conditioning is a three-token *prefix* in front of the codes::

    position   0        1        2         3      4            N+1
    input      [age]    [sex]    [dx]      c_0    c_1    ...   c_{N-2}
    predicts                     c_0       c_1    c_2    ...   c_{N-1}

* age: years normalised to [0, 1] with ``PriorSection.age_range``, encoded by Fourier features
  ``[a, sin(π 2^f a), cos(π 2^f a)]`` and a small MLP (a continuous embedding, not bins), plus a
  learned "known"/"unknown" embedding; NaN = unknown;
* sex, diagnosis: categorical embeddings with an extra "unknown" row (``fl_app.data.covariates``).

With ``PriorSection.cond_every_position`` the condition also reaches every code directly: a linear
projection of the three prefix embeddings (B, 3d) -> (B, d), zero at initialisation, is added to each
code position's input. Through the prefix alone, a code far down a 4,096-code sequence sees the covariates
only through attention weights shared with thousands of codes; the added path is a per-position bias that
the covariates move (a zero-initialised projection also lets a prefix-only checkpoint be extended without
changing what it computes: :func:`load_prior_weights`).

In training, *condition dropout* replaces covariates by "unknown" per sample (all three with
probability ``cond_dropout``, otherwise each one independently with it), so that partial or no
conditioning works at sampling time. ``cond_dropout = 1`` trains an unconditional model.

Attention back ends (``PriorSection.attention``): ``softmax`` through
``F.scaled_dot_product_attention`` with a key/value cache for sampling, or ``linear`` (causal linear
attention, :mod:`fl_app.models.linear_attention`) with a constant-size recurrent state per layer.

Opacus: only ``nn.Linear``, ``nn.Embedding`` and ``nn.LayerNorm`` carry parameters (positions are an
``nn.Embedding`` of indices), there is no weight tying, and every parameter is used in every forward
pass (the "unknown" rows through index lookups, the age MLP even for unknown ages, multiplied by 0),
so each receives a per-sample gradient in every DP step.

Shapes: ``B`` batch, ``L`` input codes, ``N`` codes per grid, ``V`` codebook size, ``d`` width,
``H`` heads, ``hd = d / H``.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fl_app.config import PriorSection, Profile, profile_from_dict
from fl_app.data.covariates import DIAGNOSES, SEXES, UNKNOWN_DIAGNOSIS, UNKNOWN_SEX
from fl_app.models.linear_attention import (
    causal_linear_attention,
    linear_attention_decode,
    linear_attention_state,
    linear_attention_step,
)

__all__ = [
    "PREFIX_LEN",
    "ConditionalPrior",
    "SamplingState",
    "build_prior",
    "load_prior",
    "load_prior_weights",
    "make_ordering",
    "save_prior",
    "unwrap_prior",
]

PREFIX_LEN = 3
"""Condition tokens in front of the codes: age, sex, diagnosis."""

CHECKPOINT_FORMAT = "synthbrain-prior-1"


def make_ordering(n: int, kind: str = "raster", seed: int = 0) -> torch.Tensor:
    """Sequence order of the ``n`` flattened (C-order) grid cells: LongTensor (n,) of cell indices."""
    if kind == "raster":
        return torch.arange(n)
    if kind == "random":
        return torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    raise ValueError(f"unknown ordering {kind!r}")


# --------------------------------------------------------------------------- inference state


@dataclass
class _LayerCache:
    """Per-layer sampling state: softmax K/V cache (B, H, Lmax, hd) or linear (S (B,H,hd,hd), z (B,H,hd))."""

    k: torch.Tensor | None = None
    v: torch.Tensor | None = None
    s: torch.Tensor | None = None
    z: torch.Tensor | None = None


@dataclass
class SamplingState:
    """Incremental-decoding state of a :class:`ConditionalPrior` (from :meth:`ConditionalPrior.new_state`)."""

    layers: list[_LayerCache] = field(default_factory=list)
    pos: int = 0
    """Number of positions (prefix + codes) already absorbed."""
    cond: torch.Tensor | None = None
    """(B, d) condition added to every code input (``cond_every_position``), set by ``prefill``."""


# --------------------------------------------------------------------------- modules


class AgeEmbedding(nn.Module):
    """Continuous age embedding: age (B,) years, NaN = unknown -> (B, d)."""

    def __init__(self, d: int, age_range: tuple[float, float], n_freq: int) -> None:
        super().__init__()
        self.lo, self.hi = float(age_range[0]), float(age_range[1])
        self.register_buffer("freqs", math.pi * 2.0 ** torch.arange(n_freq, dtype=torch.float32))
        self.mlp = nn.Sequential(nn.Linear(1 + 2 * n_freq, d), nn.GELU(), nn.Linear(d, d))
        self.status = nn.Embedding(2, d)  # 0 = known, 1 = unknown

    def forward(self, age: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
        """age (B,) float, drop (B,) bool (treat as unknown) -> (B, d)."""
        known = torch.isfinite(age) & ~drop
        a = torch.where(known, (age - self.lo) / (self.hi - self.lo), torch.zeros_like(age))
        a = a.to(self.freqs.dtype).unsqueeze(-1)  # (B, 1)
        feats = torch.cat([a, torch.sin(a * self.freqs), torch.cos(a * self.freqs)], dim=-1)
        emb = self.mlp(feats.to(self.mlp[0].weight.dtype))
        return emb * known.unsqueeze(-1).to(emb.dtype) + self.status((~known).long())


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention, softmax (SDPA + KV cache) or linear (recurrent state)."""

    def __init__(self, cfg: PriorSection) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.d = cfg.d_model
        self.kind = cfg.attention
        self.linear_impl = cfg.linear_impl
        self.linear_chunk = cfg.linear_chunk
        self.dropout = cfg.dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor, cache: _LayerCache | None = None, pos: int = 0) -> torch.Tensor:
        """x (B, T, d) -> (B, T, d).

        Without ``cache``: the T positions are a whole sequence (causal). With ``cache``: they are
        positions ``pos .. pos+T-1`` following the ``pos`` already cached, and the cache is updated.
        """
        b, t, _ = x.shape
        h = self.n_heads
        q, k, v = self.qkv(x).view(b, t, 3, h, self.d // h).permute(2, 0, 3, 1, 4)  # each (B, H, T, hd)
        if self.kind == "softmax":
            if cache is None:
                y = F.scaled_dot_product_attention(
                    q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
                )
            else:
                cache.k[:, :, pos : pos + t] = k
                cache.v[:, :, pos : pos + t] = v
                keys, vals = cache.k[:, :, : pos + t], cache.v[:, :, : pos + t]
                if t == 1:
                    y = F.scaled_dot_product_attention(q, keys, vals)
                else:
                    qi = torch.arange(pos, pos + t, device=x.device)
                    mask = qi[:, None] >= torch.arange(pos + t, device=x.device)[None, :]
                    y = F.scaled_dot_product_attention(q, keys, vals, attn_mask=mask)
        elif cache is None:
            y = causal_linear_attention(q, k, v, impl=self.linear_impl, chunk=self.linear_chunk)
        else:
            y = linear_attention_step(q, k, v, (cache.s, cache.z))
        return self.proj(y.transpose(1, 2).reshape(b, t, self.d))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x)). (B, T, d) -> (B, T, d)."""

    def __init__(self, cfg: PriorSection) -> None:
        super().__init__()
        d = cfg.d_model
        self.ln1 = nn.LayerNorm(d)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, cfg.mlp_ratio * d)
        self.fc_out = nn.Linear(cfg.mlp_ratio * d, d)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, cache: _LayerCache | None = None, pos: int = 0) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x), cache, pos))
        return x + self.drop(self.fc_out(F.gelu(self.fc(self.ln2(x)))))

    def decode_one(self, x: torch.Tensor, cache: _LayerCache, pos: int) -> torch.Tensor:
        """Sampling hot path, one new position (no dropout): x (B, d) -> (B, d).

        The same computation as ``forward(x[:, None], cache, pos)`` with fewer operator calls (plain
        functional ops on 2-D tensors, no module dispatch): at batch 1 on a CPU the step is bound
        by per-operator overhead and by reading the weights, not by arithmetic.
        """
        a = self.attn
        b, d = x.shape
        h = a.n_heads
        hd = d // h
        hid = F.layer_norm(x, (d,), self.ln1.weight, self.ln1.bias, self.ln1.eps)
        qkv = F.linear(hid, a.qkv.weight, a.qkv.bias)  # (B, 3d)
        if a.kind == "softmax":
            q, k, v = qkv.view(b, 3, h, 1, hd).unbind(1)  # each (B, H, 1, hd)
            cache.k[:, :, pos : pos + 1] = k
            cache.v[:, :, pos : pos + 1] = v
            y = F.scaled_dot_product_attention(q, cache.k[:, :, : pos + 1], cache.v[:, :, : pos + 1])
        else:
            qk = (F.elu(qkv[:, : 2 * d]) + 1.0).view(b, 2, h, hd)
            y = linear_attention_decode(
                qk[:, 0], qk[:, 1], qkv[:, 2 * d :].view(b, h, hd), (cache.s, cache.z)
            )
        x = x + F.linear(y.reshape(b, d), a.proj.weight, a.proj.bias)  # head-major, as in forward
        hid = F.layer_norm(x, (d,), self.ln2.weight, self.ln2.bias, self.ln2.eps)
        return x + F.linear(
            F.gelu(F.linear(hid, self.fc.weight, self.fc.bias)), self.fc_out.weight, self.fc_out.bias
        )


class ConditionalPrior(nn.Module):
    """Decoder-only transformer over code sequences with an [age, sex, diagnosis] prefix.

    Args:
        cfg: the profile's ``prior`` section.
        num_codes: vocabulary = VQ-VAE codebook size V (no BOS token: the prefix plays that role).
        code_shape: (cx, cy, cz) of the code grid; N = cx·cy·cz.
    """

    def __init__(self, cfg: PriorSection, num_codes: int, code_shape: tuple[int, int, int]) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_codes = int(num_codes)
        self.code_shape = tuple(int(s) for s in code_shape)
        self.seq_len = math.prod(self.code_shape)
        d = cfg.d_model
        self.tok_emb = nn.Embedding(self.num_codes, d)
        self.pos_emb = nn.Embedding(PREFIX_LEN + self.seq_len - 1, d)
        self.age_emb = AgeEmbedding(d, cfg.age_range, cfg.age_frequencies)
        self.sex_emb = nn.Embedding(len(SEXES) + 1, d)  # last row = unknown
        self.dx_emb = nn.Embedding(len(DIAGNOSES) + 1, d)  # last row = unknown
        self.cond_proj = nn.Linear(PREFIX_LEN * d, d) if cfg.cond_every_position else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layers)])
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, self.num_codes)
        order = make_ordering(self.seq_len, cfg.ordering, cfg.ordering_seed)
        self.register_buffer("order", order)
        self.register_buffer("inverse_order", torch.argsort(order))
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2 scaled init of residual projections
            if name.endswith(("attn.proj.weight", "fc_out.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layers))
        if self.cond_proj is not None:  # starts as a prefix-only model
            nn.init.zeros_(self.cond_proj.weight)
            nn.init.zeros_(self.cond_proj.bias)

    def sampling_copy(self, dtype: torch.dtype, device: torch.device | str | None = None) -> ConditionalPrior:
        """A copy for sampling in ``dtype`` (e.g. bfloat16); ``self`` is not modified.

        The age embedding stays float32: its Fourier features reach frequencies (π·2^k) at which bfloat16's
        8-bit mantissa would scramble the phase. Everything on the per-token path is cast.
        """
        m = copy.deepcopy(self)
        if device is not None:
            m = m.to(device)
        for name, child in m.named_children():
            if name != "age_emb":
                child.to(dtype)
        return m

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    # ----------------------------------------------------------------- ordering

    def grid_to_sequence(self, codes: torch.Tensor) -> torch.Tensor:
        """Code grids (B, cx, cy, cz) -> sequences (B, N) in model order."""
        if tuple(codes.shape[1:]) != self.code_shape:
            raise ValueError(
                f"code grid {tuple(codes.shape[1:])} does not match the prior's {self.code_shape}"
            )
        return codes.reshape(codes.shape[0], -1)[:, self.order]

    def sequence_to_grid(self, seq: torch.Tensor) -> torch.Tensor:
        """Sequences (B, N) in model order -> code grids (B, cx, cy, cz)."""
        return seq[:, self.inverse_order].reshape(seq.shape[0], *self.code_shape)

    # ----------------------------------------------------------------- conditioning

    def condition_prefix(self, age: torch.Tensor, sex: torch.Tensor, diagnosis: torch.Tensor) -> torch.Tensor:
        """Covariates -> prefix embeddings (B, 3, d), with condition dropout in training mode.

        Args:
            age: (B,) float years (NaN = unknown).
            sex: (B,) long index into SEXES; UNKNOWN_SEX (or any out-of-range value) = unknown.
            diagnosis: (B,) long index into DIAGNOSES; UNKNOWN_DIAGNOSIS (or out of range) = unknown.
        """
        b = age.shape[0]
        dev = self.head.weight.device
        age = age.to(dev).reshape(b)
        sex = sex.to(dev).long().reshape(b)
        diagnosis = diagnosis.to(dev).long().reshape(b)
        sex = torch.where((sex >= 0) & (sex < UNKNOWN_SEX), sex, torch.full_like(sex, UNKNOWN_SEX))
        diagnosis = torch.where(
            (diagnosis >= 0) & (diagnosis < UNKNOWN_DIAGNOSIS),
            diagnosis,
            torch.full_like(diagnosis, UNKNOWN_DIAGNOSIS),
        )
        p = self.cfg.cond_dropout
        if self.training and p > 0:
            drop = (torch.rand(b, 1, device=dev) < p) | (torch.rand(b, 3, device=dev) < p)
        else:
            drop = torch.zeros(b, 3, dtype=torch.bool, device=dev)
        sex = torch.where(drop[:, 1], torch.full_like(sex, UNKNOWN_SEX), sex)
        diagnosis = torch.where(drop[:, 2], torch.full_like(diagnosis, UNKNOWN_DIAGNOSIS), diagnosis)
        dt = self.tok_emb.weight.dtype  # the age embedding may stay float32 in a bfloat16 sampling copy
        return torch.stack(
            [self.age_emb(age, drop[:, 0]).to(dt), self.sex_emb(sex), self.dx_emb(diagnosis)], dim=1
        )

    def condition_vector(self, prefix: torch.Tensor) -> torch.Tensor | None:
        """Prefix embeddings (B, 3, d) -> the (B, d) added to every code input, or None (prefix only)."""
        if self.cond_proj is None:
            return None
        return self.cond_proj(prefix.reshape(prefix.shape[0], -1))

    # ----------------------------------------------------------------- full (parallel) pass

    def forward(
        self, tokens: torch.Tensor, age: torch.Tensor, sex: torch.Tensor, diagnosis: torch.Tensor
    ) -> torch.Tensor:
        """Teacher-forced pass.

        Args:
            tokens: (B, L) codes in model order, 0 <= L <= N - 1 (for training: ``seq[:, :-1]``).
            age, sex, diagnosis: (B,) covariates, see :meth:`condition_prefix`.

        Returns:
            logits (B, L + 1, V); ``logits[:, i]`` is the distribution of code ``i`` given the prefix
            and ``tokens[:, :i]``.
        """
        length = tokens.shape[1]
        if length > self.seq_len - 1:
            raise ValueError(f"at most {self.seq_len - 1} input codes, got {length}")
        prefix = self.condition_prefix(age, sex, diagnosis)
        codes = self.tok_emb(tokens)
        cond = self.condition_vector(prefix)
        if cond is not None:
            codes = codes + cond.unsqueeze(1)
        x = torch.cat([prefix, codes], dim=1)
        # positions as a (B, T) index tensor: Opacus' embedding grad sampler needs the batch dimension
        pos = torch.arange(PREFIX_LEN + length, device=x.device).expand(x.shape[0], -1)
        x = self.drop(x + self.pos_emb(pos))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x[:, PREFIX_LEN - 1 :]))

    def nll(
        self, seq: torch.Tensor, age: torch.Tensor, sex: torch.Tensor, diagnosis: torch.Tensor
    ) -> torch.Tensor:
        """Per-sample mean negative log-likelihood in nats per code: seq (B, N) -> (B,)."""
        logits = self(seq[:, :-1], age, sex, diagnosis)
        ce = F.cross_entropy(logits.reshape(-1, self.num_codes).float(), seq.reshape(-1), reduction="none")
        return ce.view(seq.shape).mean(1)

    # ----------------------------------------------------------------- incremental decoding

    def new_state(
        self, batch: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> SamplingState:
        """Empty sampling state: preallocated K/V caches (softmax) or zero recurrent states (linear)."""
        w = self.head.weight
        device = w.device if device is None else device
        dtype = w.dtype if dtype is None else dtype
        h = self.cfg.n_heads
        hd = self.cfg.d_model // h
        total = PREFIX_LEN + self.seq_len - 1
        layers = []
        for _ in self.blocks:
            if self.cfg.attention == "softmax":
                layers.append(
                    _LayerCache(
                        k=torch.zeros(batch, h, total, hd, device=device, dtype=dtype),
                        v=torch.zeros(batch, h, total, hd, device=device, dtype=dtype),
                    )
                )
            else:
                s, z = linear_attention_state(batch, h, hd, hd, device, dtype)
                layers.append(_LayerCache(s=s, z=z))
        return SamplingState(layers=layers, pos=0)

    def _advance(self, x: torch.Tensor, state: SamplingState) -> torch.Tensor:
        """Embeddings (B, T, d) at positions state.pos.. -> last position's logits (B, V)."""
        t = x.shape[1]
        pos = torch.arange(state.pos, state.pos + t, device=x.device)
        x = x + self.pos_emb(pos)
        for block, cache in zip(self.blocks, state.layers, strict=True):
            x = block(x, cache, state.pos)
        state.pos += t
        return self.head(self.ln_f(x[:, -1]))

    @torch.no_grad()
    def prefill(
        self, age: torch.Tensor, sex: torch.Tensor, diagnosis: torch.Tensor, state: SamplingState
    ) -> torch.Tensor:
        """Absorb the condition prefix into a fresh ``state``; returns logits (B, V) of code 0."""
        if state.pos != 0:
            raise ValueError("prefill needs a fresh state")
        prefix = self.condition_prefix(age, sex, diagnosis)
        state.cond = self.condition_vector(prefix)
        return self._advance(prefix, state)

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, state: SamplingState) -> torch.Tensor:
        """Absorb one code per sample, tokens (B,); returns logits (B, V) of the next code."""
        if state.pos >= PREFIX_LEN + self.seq_len - 1:
            raise ValueError("the sequence is complete")
        pos = state.pos
        x = F.embedding(tokens.view(-1), self.tok_emb.weight) + self.pos_emb.weight[pos]  # (B, d)
        if state.cond is not None:
            x = x + state.cond
        for block, cache in zip(self.blocks, state.layers, strict=True):
            x = block.decode_one(x, cache, pos)
        state.pos = pos + 1
        return F.linear(
            F.layer_norm(x, x.shape[-1:], self.ln_f.weight, self.ln_f.bias, self.ln_f.eps),
            self.head.weight,
            self.head.bias,
        )


# --------------------------------------------------------------------------- build / save / load


def build_prior(profile: Profile, prior_cfg: PriorSection | None = None) -> ConditionalPrior:
    """The prior for ``profile``: vocabulary = ``vqvae.num_embeddings``, grid = ``profile.code_shape``."""
    return ConditionalPrior(prior_cfg or profile.prior, profile.vqvae.num_embeddings, profile.code_shape)


def unwrap_prior(model: nn.Module) -> ConditionalPrior:
    """The :class:`ConditionalPrior` inside an Opacus ``GradSampleModule`` (or the model itself)."""
    m = model
    while not isinstance(m, ConditionalPrior) and hasattr(m, "_module"):  # Opacus GradSampleModule
        m = m._module
    if not isinstance(m, ConditionalPrior):
        raise TypeError(f"expected a ConditionalPrior, got {type(model).__name__}")
    return m


def save_prior(
    model: nn.Module, profile: Profile, path: str | Path, extra: dict[str, Any] | None = None
) -> Path:
    """Write one ``.pt`` file: state_dict, the prior section actually used, vocabulary, grid, profile."""
    m = unwrap_prior(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "format": CHECKPOINT_FORMAT,
            "state_dict": {k: v.detach().cpu() for k, v in m.state_dict().items()},
            "prior": m.cfg.model_dump(mode="json"),
            "num_codes": m.num_codes,
            "code_shape": list(m.code_shape),
            "profile": profile.model_dump(mode="json"),
            "extra": dict(extra or {}),
        },
        path,
    )
    return path


def load_prior_weights(model: ConditionalPrior, path: str | Path) -> list[str]:
    """Load a prior checkpoint's weights into ``model`` to continue training it; returns the added tensors.

    The checkpoint must have the same vocabulary, grid and architecture, except that ``model`` may add the
    ``cond_every_position`` projection to a prefix-only checkpoint: that projection keeps its zero
    initialisation, so the loaded model computes exactly what the checkpoint did.

    Raises:
        ValueError: not a prior checkpoint, or its vocabulary, grid or tensors do not match (naming them).
    """
    payload = torch.load(Path(path), map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a synthbrain prior checkpoint")
    if payload["num_codes"] != model.num_codes or tuple(payload["code_shape"]) != model.code_shape:
        raise ValueError(
            f"{path}: vocabulary {payload['num_codes']} / grid {tuple(payload['code_shape'])} do not match "
            f"the model's {model.num_codes} / {model.code_shape}"
        )
    state = payload["state_dict"]
    own = model.state_dict()
    added = sorted(k for k in own if k not in state)
    unexpected = sorted(k for k in state if k not in own)
    bad_shape = sorted(k for k in state if k in own and state[k].shape != own[k].shape)
    if unexpected or bad_shape or any(not k.startswith("cond_proj.") for k in added):
        raise ValueError(
            f"{path}: its tensors do not fit this prior (missing {added or 'none'}, unexpected "
            f"{unexpected or 'none'}, other shape {bad_shape or 'none'})"
        )
    model.load_state_dict(state, strict=False)
    return added


def load_prior(
    path: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[ConditionalPrior, Profile]:
    """Read a file written by :func:`save_prior`; returns (model in eval mode, profile).

    The checkpoint's ``extra`` dict is attached as ``model.checkpoint_extra``.
    """
    payload = torch.load(Path(path), map_location=map_location, weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a synthbrain prior checkpoint")
    profile = profile_from_dict(payload["profile"], source=str(path))
    cfg = PriorSection.model_validate(payload["prior"])
    model = ConditionalPrior(cfg, payload["num_codes"], tuple(payload["code_shape"]))
    model.load_state_dict(payload["state_dict"])
    model.to(map_location)
    model.eval()
    model.checkpoint_extra = payload.get("extra", {})
    return model, profile
