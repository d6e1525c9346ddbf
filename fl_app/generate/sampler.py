"""Batched autoregressive sampling of code grids from a :class:`~fl_app.models.prior.ConditionalPrior`.

Unlike MONAI's ``VQVAETransformerInferer.sample``, which recomputes the whole sequence for every new
token (O(N²) token-forwards per sample), the sampler absorbs the condition prefix once and then one
token per step: a key/value cache for the softmax back end, the constant-size recurrent state for the
linear back end. ``use_cache=False`` keeps the recompute path as a reference (used by the tests).

The returned code grids (n, cx, cy, cz) go straight into ``fl_app.models.vqvae.decode``.

Reproducibility: with ``seed`` (or a ``generator``), the same call gives the same codes. Samples
are drawn batch after batch from one generator, so the codes of sample ``i`` depend on
``batch_size`` as well as the seed.

Classifier-free guidance: the prior is trained with each covariate dropped to "unknown" independently
(:mod:`fl_app.models.prior`), so it also gives the logits ``l_k`` of the partial conditions "first k of (age,
sex, diagnosis) known". ``guidance`` w draws from ``l_0 + w·(l_3 − l_0)`` (w = 1: plain conditional sampling,
w > 1 follows the covariates more strongly, w = 0 ignores them). One weight per covariate (``{"age": 3, "sex": 5,
"diagnosis": 5}``, missing ones 1) chains the same idea: ``l_0 + w_age·(l_1 − l_0) + w_sex·(l_2 − l_1) +
w_diagnosis·(l_3 − l_2)``, which is the single-weight rule when the weights are equal. Every distinct partial
condition with a non-zero coefficient costs one more forward pass per token (2 for one weight, up to 4).

Precision: ``precision="bfloat16"`` samples from a bfloat16 copy of the model (the caller's model is not
touched; logits are drawn from in float32). At batch 1 each token streams every weight through the cores
once, so halving the bytes is the main lever on a CPU (and the usual choice on a GPU). The codes can differ
from float32 sampling where two codes are nearly tied; ``"float32"`` (the default) is exact.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from fl_app.data.covariates import (
    DIAGNOSES,
    SEXES,
    UNKNOWN_DIAGNOSIS,
    UNKNOWN_SEX,
    diagnosis_index,
    sex_index,
)
from fl_app.models.prior import unwrap_prior

__all__ = [
    "COVARIATES",
    "PRECISIONS",
    "filter_logits",
    "guidance_levels",
    "make_condition",
    "normalize_guidance",
    "parse_guidance",
    "sample",
    "sample_next",
]

COVARIATES: tuple[str, str, str] = ("age", "sex", "diagnosis")
"""The covariates in the order guidance chains them (see the module docstring)."""

Guidance = float | Mapping[str, float]
"""One classifier-free guidance weight, or one per covariate of :data:`COVARIATES` (missing ones 1)."""

PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16}
"""Weight / activation dtypes the sampler can run the prior in."""


def make_condition(
    n: int,
    age: float | tuple[float, float] | Sequence[float] | None = None,
    sex: str | None = None,
    diagnosis: str | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Condition tensors for ``n`` samples, e.g. women aged 70–80 with AD:
    ``make_condition(8, age=(70, 80), sex="F", diagnosis="AD")``.

    Args:
        n: number of samples.
        age: None (unknown), one age for all, or a ``(low, high)`` range drawn uniformly per sample.
        sex: "F", "M" or None (unknown).
        diagnosis: "CN", "MCI", "AD" or None (unknown).
        generator: RNG for drawing ages from a range.

    Returns:
        ``{"age": float (n,) (NaN = unknown), "sex": long (n,), "diagnosis": long (n,)}``.
    """
    if sex is not None and sex not in SEXES:
        raise ValueError(f"sex must be one of {SEXES} or None, got {sex!r}")
    if diagnosis is not None and diagnosis not in DIAGNOSES:
        raise ValueError(f"diagnosis must be one of {DIAGNOSES} or None, got {diagnosis!r}")
    if age is None:
        ages = torch.full((n,), math.nan)
    elif isinstance(age, (int, float)):
        ages = torch.full((n,), float(age))
    else:
        lo, hi = (float(a) for a in age)
        if not lo <= hi:
            raise ValueError(f"age range must be (low, high) with low <= high, got {[lo, hi]}")
        ages = lo + (hi - lo) * torch.rand(n, generator=generator)
    return {
        "age": ages,
        "sex": torch.full((n,), sex_index(sex), dtype=torch.long),
        "diagnosis": torch.full((n,), diagnosis_index(diagnosis), dtype=torch.long),
    }


def parse_guidance(text: str | float) -> float | dict[str, float]:
    """``"3"`` -> 3.0; ``"age=3,sex=5,diagnosis=5"`` -> one weight per covariate (missing ones 1); a per-covariate
    spec whose weights are all equal is returned as that one weight. Raises ``ValueError`` naming the problem."""
    if isinstance(text, (int, float)):
        return float(text)
    text = str(text).strip()
    try:
        return float(text)
    except ValueError:
        pass
    out: dict[str, float] = {}
    for part in text.split(","):
        key, sep, val = part.partition("=")
        key = key.strip()
        if not sep or key not in COVARIATES:
            raise ValueError(
                f"guidance {text!r}: expected a number or {'=W,'.join(COVARIATES)}=W, got {part!r}"
            )
        try:
            out[key] = float(val)
        except ValueError as e:
            raise ValueError(f"guidance {text!r}: {key} needs a number, got {val!r}") from e
    return normalize_guidance(out)


def _guidance_weights(guidance: Guidance) -> list[float]:
    """The three weights in :data:`COVARIATES` order (missing ones 1); ``ValueError`` for an unknown covariate
    or a weight that is not finite."""
    if isinstance(guidance, Mapping):
        unknown = set(guidance) - set(COVARIATES)
        if unknown:
            raise ValueError(f"guidance: unknown covariates {sorted(unknown)}; known: {list(COVARIATES)}")
        w = [float(guidance.get(c, 1.0)) for c in COVARIATES]
    else:
        w = [float(guidance)] * 3
    if not all(math.isfinite(v) for v in w):
        raise ValueError(f"guidance weights must be finite, got {w}")
    return w


def normalize_guidance(guidance: Guidance) -> float | dict[str, float]:
    """The one recorded form of a guidance setting: a float when the weights are equal, else all three
    covariates' weights (missing ones 1). Raises ``ValueError`` as :func:`guidance_levels` does."""
    w = _guidance_weights(guidance)
    return w[0] if len(set(w)) == 1 else dict(zip(COVARIATES, w, strict=True))


def guidance_levels(guidance: Guidance) -> list[tuple[int, float]]:
    """``[(k, coefficient)]``: the guided logits are ``Σ coefficient · l_k`` over partial conditions "first k of
    :data:`COVARIATES` known" (k = 0..3, most known last); terms with coefficient 0 are left out."""
    w = _guidance_weights(guidance)
    coef = [1.0 - w[0], w[0] - w[1], w[1] - w[2], w[2]]
    return [(k, c) for k, c in enumerate(coef) if c != 0.0]


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Top-k then nucleus (top-p) filtering: logits (B, V) -> logits with excluded entries at -inf.

    Top-p keeps the smallest set of most probable tokens whose probability reaches ``top_p`` (the
    most probable token always stays).
    """
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p is not None and top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        remove = (cum - sorted_logits.softmax(-1)) >= top_p  # mass before this token already enough
        remove[:, 0] = False
        logits = logits.masked_fill(remove.scatter(1, idx, remove), -math.inf)
    return logits


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw one code per row: logits (B, V) -> LongTensor (B,). ``temperature <= 0`` = greedy."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = filter_logits(logits.float() / temperature, top_k, top_p)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def _cond_tensor(cond: Mapping[str, torch.Tensor] | None, key: str, n: int) -> torch.Tensor:
    if cond is None or cond.get(key) is None:
        if key == "age":
            return torch.full((n,), math.nan)
        return torch.full((n,), UNKNOWN_SEX if key == "sex" else UNKNOWN_DIAGNOSIS, dtype=torch.long)
    t = torch.as_tensor(cond[key])
    if t.dim() == 0:
        t = t.expand(n)
    if t.shape != (n,):
        raise ValueError(f"cond[{key!r}] must have shape ({n},), got {tuple(t.shape)}")
    return t.float() if key == "age" else t.long()


@torch.no_grad()
def sample(
    model: nn.Module,
    n: int,
    cond: Mapping[str, torch.Tensor] | None = None,
    code_shape: tuple[int, int, int] | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    batch_size: int | None = None,
    progress: bool = True,
    device: str | torch.device | None = None,
    use_cache: bool = True,
    precision: str = "float32",
    guidance: Guidance = 1.0,
) -> torch.Tensor:
    """Sample ``n`` code grids.

    Args:
        model: a :class:`~fl_app.models.prior.ConditionalPrior` or an Opacus wrapper of one (put in eval mode for the call; its mode is restored).
        n: number of samples.
        cond: ``{"age": float (n,), "sex": long (n,), "diagnosis": long (n,)}``; a missing key, NaN age
            or an "unknown" index means unconditional in that covariate (see :func:`make_condition`).
        code_shape: must equal the model's grid if given (a check; the grid is fixed by the model).
        temperature: softmax temperature; ``<= 0`` means greedy decoding.
        top_k: keep only the k most probable codes.
        top_p: nucleus sampling threshold in (0, 1].
        generator: torch RNG (on ``device``) to draw from; overrides ``seed``.
        seed: seeds a fresh generator, for reproducible samples.
        batch_size: samples decoded together (default: all ``n``).
        progress: show a tqdm progress bar over tokens.
        device: where to run (default: the model's device).
        use_cache: False = recompute the whole sequence for every token (reference path).
        precision: ``"float32"`` or ``"bfloat16"`` (a bfloat16 copy of the model; see the module docstring).
        guidance: classifier-free guidance weight, or one per covariate (1 = none; see the module docstring).

    Returns:
        LongTensor (n, cx, cy, cz) on the CPU, codes in [0, V).
    """
    model = unwrap_prior(model)
    if code_shape is not None and tuple(code_shape) != model.code_shape:
        raise ValueError(f"code_shape {tuple(code_shape)} does not match the model's {model.code_shape}")
    dev = torch.device(device) if device is not None else model.head.weight.device
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    dtype = PRECISIONS[precision]
    if model.head.weight.dtype != dtype:
        model = model.sampling_copy(dtype, dev)
    if generator is None:
        generator = torch.Generator(device=dev)
        if seed is not None:
            generator.manual_seed(seed)
        else:
            generator.seed()
    age = _cond_tensor(cond, "age", n)
    sex = _cond_tensor(cond, "sex", n)
    dx = _cond_tensor(cond, "diagnosis", n)
    bs = n if not batch_size else int(batch_size)
    levels = guidance_levels(guidance)
    guided = levels != [(3, 1.0)]
    seq_len = model.seq_len
    was_training = model.training
    model.to(dev).eval()
    out = []
    bar = tqdm(total=n * seq_len, unit="tok", disable=not progress, desc="sampling codes")
    try:
        for s in range(0, n, bs):
            sl = slice(s, min(s + bs, n))
            a, x, d = age[sl].to(dev), sex[sl].to(dev), dx[sl].to(dev)
            b = a.shape[0]
            if guided:  # rows [j·b, (j+1)·b) are the same sequences under the j-th level's partial condition
                unk_a, unk_x, unk_d = (
                    torch.full_like(a, math.nan),
                    torch.full_like(x, UNKNOWN_SEX),
                    torch.full_like(d, UNKNOWN_DIAGNOSIS),
                )
                a = torch.cat([a if k >= 1 else unk_a for k, _ in levels])
                x = torch.cat([x if k >= 2 else unk_x for k, _ in levels])
                d = torch.cat([d if k >= 3 else unk_d for k, _ in levels])
            rows = a.shape[0]
            tokens = torch.empty(rows, seq_len, dtype=torch.long, device=dev)
            if use_cache:
                state = model.new_state(rows, dev)
                logits = model.prefill(a, x, d, state)
            for i in range(seq_len):
                if not use_cache:
                    logits = model(tokens[:, :i], a, x, d)[:, -1]
                if guided:
                    lg = sum(c * logits[j * b : (j + 1) * b].float() for j, (_, c) in enumerate(levels))
                    nxt = sample_next(lg, temperature, top_k, top_p, generator)
                    tokens[:, i] = nxt.repeat(len(levels))
                else:
                    tokens[:, i] = sample_next(logits, temperature, top_k, top_p, generator)
                if use_cache and i < seq_len - 1:
                    logits = model.step(tokens[:, i], state)
                bar.update(b)
            tokens = tokens[:b]
            out.append(model.sequence_to_grid(tokens).cpu())
    finally:
        bar.close()
        model.train(was_training)
    if not out:
        return torch.empty(0, *model.code_shape, dtype=torch.long)
    return torch.cat(out)
