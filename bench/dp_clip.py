"""The DP-SGD clip bound for fine-tuning a checkpoint, chosen on public data only.

    python bench/dp_clip.py [--init pretrained] [--subjects 12] [--seed 7000] [--json OUT.json]

DP-SGD clips every per-sample gradient to norm C and adds N(0, (σC)²) noise to their sum; σ follows from ε,
the sampling rate and the steps, whatever C is. A C far above the per-sample gradient norms adds noise without
keeping any signal (nothing is clipped), so the fine-tune's noise-to-signal ratio is C / (typical norm) times
what it has to be. The norms must not be measured on a site's records (that would spend privacy), so this bench
measures them where they are public: the checkpoint's own pre-training data (the simulator's reserved seed
7000, scanner presets 0-2; ``fl_app/pretrained/*/README.md``), at the checkpoint's weights.

For each fine-tuning subset (``profile.finetune`` presets) it reports the per-sample gradient norm's quantiles
(training loss, train mode), the norm of their mean and their mean cosine to the mean (how much of each
sample's gradient is shared). ``recommended_clip`` is the median, rounded up to two significant figures: the
clip that keeps about half the samples whole. docs/PRIVACY.md gives the resulting site setting
(``privacy.max_grad_norm``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

VQVAE_SUBSETS = ("decoder_out", "decoder_last", "biases")
PRIOR_SUBSETS = ("prior_last", "cond_embeddings")


def _round_up(x: float, digits: int = 2) -> float:
    """``x`` rounded up to ``digits`` significant figures (0.2696 -> 0.27)."""
    if x <= 0:
        return x
    scale = 10 ** (digits - 1 - math.floor(math.log10(x)))
    return math.ceil(x * scale * (1 - 1e-6)) / scale  # float32 0.3 * 100 is 30.0000012, not above 30


def grad_norm_stats(grads: list[torch.Tensor]) -> dict[str, Any]:
    """Quantiles of the per-sample gradient norms, the norm of their mean and their mean cosine to it."""
    g = torch.stack(grads).double()
    norms = g.norm(dim=1)
    mean = g.mean(0)
    cos = torch.nn.functional.cosine_similarity(g, mean.expand_as(g), dim=1)
    q = torch.quantile(norms, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)).tolist()
    return {"n": len(grads), "trainable_parameters": int(g.shape[1]), "norm_p10": q[0], "norm_median": q[1],
            "norm_p90": q[2], "mean_gradient_norm": float(mean.norm()), "mean_cosine_to_mean": float(cos.mean()),
            "recommended_clip": _round_up(q[1])}  # fmt: skip


def _per_sample_grads(model: torch.nn.Module, losses) -> list[torch.Tensor]:
    params = [p for p in model.parameters() if p.requires_grad]
    out = []
    for loss in losses:
        g = torch.autograd.grad(loss, params)
        out.append(torch.cat([x.reshape(-1) for x in g]).detach())
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    from fl_app.config import apply_overrides
    from fl_app.data.cohort import read_bids
    from fl_app.data.dataset import SiteDataset
    from fl_app.data.simulate import simulate_sites
    from fl_app.models.finetune import apply_trainable
    from fl_app.models.pretrained import checkpoint_profile_dict, resolve_init
    from fl_app.models.prior import load_prior
    from fl_app.models.vqvae import load_vqvae
    from fl_app.train import prior_local as PL
    from fl_app.train import vqvae_local as VL

    torch.set_num_threads(args.threads)
    vq_path = resolve_init(args.init, "vqvae", args.profile)
    if vq_path is None:
        raise SystemExit("--init scratch: the clip bound is measured at a checkpoint's weights")
    try:
        prior_path = resolve_init(args.init, "prior", args.profile)
    except FileNotFoundError:
        prior_path = None
    prof = apply_overrides(checkpoint_profile_dict(prior_path or vq_path), None, source=str(vq_path))
    out: dict[str, Any] = {"init": str(vq_path), "prior_init": str(prior_path) if prior_path else None,
                           "public_seed": args.seed, "sites": args.sites, "subjects_per_site": args.subjects,
                           "platform": platform.platform(), "torch": torch.__version__, "vqvae": {},
                           "prior": {}}  # fmt: skip
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        tmp = Path(args.workdir) if args.workdir else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        paths = simulate_sites(tmp / "public", args.sites, args.subjects, prof, args.seed)
        subjects = [s for p in paths for s in read_bids(p).valid()]
        ds = SiteDataset(subjects, prof, cache_dir=tmp / "cache")
        dev = torch.device("cpu")
        batches = [VL._unpack(VL.vqvae_collate([ds[i]]), dev) for i in range(len(ds))]
        batches = [b for b in batches if b is not None]
        for subset in args.vqvae_subsets:
            model = load_vqvae(vq_path)[0]
            apply_trainable(model, [subset], "vqvae")
            model.train()
            losses = (VL.vqvae_loss(model, img, lab, has, prof)[0] for img, lab, has in batches)
            out["vqvae"][subset] = grad_norm_stats(_per_sample_grads(model, losses))
            print(json.dumps({"vqvae": {subset: out["vqvae"][subset]}}), flush=True)
        if prior_path is not None and args.prior_subsets:
            vq = load_vqvae(vq_path)[0].eval()
            codes = PL.encode_codes(vq, ds)
            for subset in args.prior_subsets:
                prior = load_prior(prior_path)[0]
                apply_trainable(prior, [subset], "prior")
                prior.train()
                items = [PL._unpack(PL.prior_collate([codes[i]]), prior, dev) for i in range(len(codes))]
                losses = (PL._loss(prior, *it) for it in items if it is not None)
                out["prior"][subset] = grad_norm_stats(_per_sample_grads(prior, losses))
                print(json.dumps({"prior": {subset: out["prior"][subset]}}), flush=True)
    out["seconds"] = time.perf_counter() - t0
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--init", default="pretrained", help="pretrained | a checkpoint folder or vqvae.pt")
    p.add_argument("--profile", default="cpu-demo")
    p.add_argument("--sites", type=int, default=3, help="public sites (scanner presets 0, 1, 2, ...)")
    p.add_argument("--subjects", type=int, default=12, help="public subjects per site")
    p.add_argument("--seed", type=int, default=7000, help="the simulator seed of the public data")
    p.add_argument("--vqvae-subsets", nargs="*", default=list(VQVAE_SUBSETS))
    p.add_argument("--prior-subsets", nargs="*", default=list(PRIOR_SUBSETS))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--workdir", default=None, help="keep the simulated public data here")
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = run(args)
    text = json.dumps(out, indent=2)
    if args.json:
        Path(args.json).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
