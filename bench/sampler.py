"""Benchmark: MONAI's VQ-VAE transformer sampler vs synthbrain's cached / recurrent sampler.

Builds the same architecture twice, with equal width, depth, heads and vocabulary:

* MONAI: ``DecoderOnlyTransformer`` (vocabulary V + 1 for its BOS token) driven by
  ``VQVAETransformerInferer.sample``, which recomputes the whole sequence for every new token. Its
  ``sample`` ends by decoding the grid with a VQ-VAE: a real, tiny MONAI ``VQVAE`` is used and the
  decode time, measured separately, is subtracted so that only token generation is compared;
* ours: :class:`fl_app.models.prior.ConditionalPrior` + :func:`fl_app.generate.sampler.sample`, once
  per attention back end (softmax with a key/value cache; linear with its recurrent state) and per
  precision (``--precisions``: float32 weights, and a bfloat16 sampling copy, reported as
  ``<backend>+bf16``; MONAI runs in float32).

Both draw with temperature 1 from the full distribution (multinomial). Every (sampler, batch)
measurement runs in a fresh subprocess so that its peak memory (RSS on CPU, CUDA peak allocation on
GPU) is its own. Prints one JSON document (and writes it with ``--json OUT``)::

    monai_tokens_per_s   {batch: tokens/s}
    ours_tokens_per_s    {backend: {batch: tokens/s}}
    speedup              {backend: {batch: ours / monai}}
    peak_memory_mb       {"monai" | backend: {batch: MiB}}
    seconds              {"monai" | backend: {batch: wall seconds of the timed run}}

Default: an 8×8×8 grid (512 tokens), width 256, depth 8, 8 heads, 256 codes, batches 1 and 8, 2
threads. The published GPU size: ``--grid 10 14 10 --width 512 --depth 24 --heads 16 --vocab 2048``.
A quick smoke run: ``--grid 4 4 4 --batches 1``. Do not read timings from a busy machine.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _measure_monai(args: argparse.Namespace, batch: int, device) -> dict[str, Any]:
    import torch
    from monai.inferers import VQVAETransformerInferer
    from monai.networks.nets import VQVAE, DecoderOnlyTransformer
    from monai.utils.ordering import Ordering, OrderingType

    grid = tuple(args.grid)
    n = math.prod(grid)
    transformer = DecoderOnlyTransformer(
        num_tokens=args.vocab + 1,
        max_seq_len=n + 1,
        attn_layers_dim=args.width,
        attn_layers_depth=args.depth,
        attn_layers_heads=args.heads,
        use_flash_attention=args.monai_flash,
    ).to(device)
    vqvae = VQVAE(  # one down-sampling level, tiny: only its decode_samples is used
        spatial_dims=3,
        in_channels=1,
        out_channels=1,
        channels=(8,),
        num_res_layers=1,
        num_res_channels=(8,),
        downsample_parameters=((2, 4, 1, 1),),
        upsample_parameters=((2, 4, 1, 1, 0),),
        num_embeddings=args.vocab,
        embedding_dim=8,
    ).to(device)
    transformer.eval()
    vqvae.eval()
    ordering = Ordering(ordering_type=OrderingType.RASTER_SCAN.value, spatial_dims=3, dimensions=(1, *grid))
    inferer = VQVAETransformerInferer()
    start = torch.full((batch, 1), args.vocab, dtype=torch.long, device=device)
    torch.manual_seed(args.seed)
    with torch.no_grad():  # warm-up: a few short forward passes
        for length in (1, 8, 32):
            transformer(torch.zeros(batch, min(length, n), dtype=torch.long, device=device))
    _sync(device)
    rss0 = _rss_mb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    images = inferer.sample(
        latent_spatial_dim=grid,
        starting_tokens=start,
        vqvae_model=vqvae,
        transformer_model=transformer,
        ordering=ordering,
        temperature=1.0,
        verbose=args.progress,
    )
    _sync(device)
    total = time.perf_counter() - t0
    assert images.shape[0] == batch
    codes = torch.randint(0, args.vocab, (batch, *grid), device=device)
    t1 = time.perf_counter()
    with torch.no_grad():
        vqvae.decode_samples(codes)
    _sync(device)
    decode_s = time.perf_counter() - t1
    gen_s = max(total - decode_s, 1e-9)
    return {
        "tokens_per_s": batch * n / gen_s,
        "seconds": gen_s,
        "decode_seconds": decode_s,
        "peak_memory_mb": _peak_memory(device, rss0),
        "n_parameters": sum(p.numel() for p in transformer.parameters()),
    }


def _measure_ours(
    args: argparse.Namespace, backend: str, batch: int, device, precision: str = "float32"
) -> dict[str, Any]:
    import torch

    from fl_app.config import PriorSection
    from fl_app.generate.sampler import PRECISIONS, make_condition, sample
    from fl_app.models.prior import ConditionalPrior

    grid = tuple(args.grid)
    n = math.prod(grid)
    cfg = PriorSection(d_model=args.width, n_layers=args.depth, n_heads=args.heads, attention=backend)
    model = ConditionalPrior(cfg, args.vocab, grid).to(device).eval()
    if precision != "float32":  # what sample(precision=...) does, done once outside the timed runs
        model = model.sampling_copy(PRECISIONS[precision], device).eval()
    cond = make_condition(
        batch, age=(70.0, 80.0), sex="F", diagnosis="AD", generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():  # warm-up: prefill and a few steps
        state = model.new_state(batch)
        model.prefill(cond["age"], cond["sex"], cond["diagnosis"], state)
        for _ in range(min(8, n - 1)):
            model.step(torch.zeros(batch, dtype=torch.long, device=device), state)
        del state
    _sync(device)
    rss0 = _rss_mb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    best = math.inf
    for r in range(args.repeats):
        t0 = time.perf_counter()
        codes = sample(model, batch, cond, seed=args.seed + r, progress=args.progress, device=device)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    assert codes.shape == (batch, *grid)
    return {
        "tokens_per_s": batch * n / best,
        "seconds": best,
        "peak_memory_mb": _peak_memory(device, rss0),
        "n_parameters": sum(p.numel() for p in model.parameters()),
    }


def _peak_memory(device, rss0: float) -> dict[str, float]:
    import torch

    if device.type == "cuda":
        return {"cuda_peak_allocated_mb": torch.cuda.max_memory_allocated(device) / 2**20}
    return {"process_peak_rss_mb": _peak_rss_mb(), "rss_before_sampling_mb": rss0}


def _one(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    torch.set_num_threads(args.threads)
    device = torch.device(
        args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    which, batch = args.one.split(":")
    if which == "monai":
        return _measure_monai(args, int(batch), device)
    backend, _, prec = which.partition("+")
    return _measure_ours(args, backend, int(batch), device, {"": "float32", "bf16": "bfloat16"}[prec])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--grid", type=int, nargs=3, default=[8, 8, 8], metavar=("CX", "CY", "CZ"))
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--depth", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=256, help="codebook size (MONAI gets one more for BOS)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--backends", nargs="+", default=["softmax", "linear"], choices=["softmax", "linear"])
    p.add_argument(
        "--precisions", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"]
    )
    p.add_argument("--skip-monai", action="store_true", help="only our sampler (e.g. published size on CPU)")
    p.add_argument("--monai-flash", action="store_true", help="MONAI with use_flash_attention=True (SDPA)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of our sampler (best is kept)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--progress", action="store_true", help="show progress bars")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: one measurement, 'monai:1' / 'softmax:8'
    args = p.parse_args(argv)
    if args.width % args.heads:
        p.error("--width must be divisible by --heads")

    if args.one:
        print(json.dumps(_one(args)))
        return 0

    runs = [] if args.skip_monai else [("monai", b) for b in args.batches]
    labels = [be + ("" if pr == "float32" else "+bf16") for be in args.backends for pr in args.precisions]
    runs += [(lab, b) for lab in labels for b in args.batches]
    raw: dict[str, dict[str, Any]] = {}
    passthrough = [a for a in (argv if argv is not None else sys.argv[1:])]
    for which, batch in runs:
        cmd = [sys.executable, __file__, *passthrough, "--one", f"{which}:{batch}"]
        print(f"measuring {which} at batch {batch} ...", file=sys.stderr, flush=True)
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            print(proc.stderr, file=sys.stderr)
            raise SystemExit(f"{which} at batch {batch} failed")
        raw.setdefault(which, {})[str(batch)] = json.loads(proc.stdout.strip().splitlines()[-1])

    import torch

    result: dict[str, Any] = {
        "config": {
            "grid": args.grid,
            "tokens_per_sample": math.prod(args.grid),
            "width": args.width,
            "depth": args.depth,
            "heads": args.heads,
            "vocab": args.vocab,
            "threads": args.threads,
            "device": args.device,
            "monai_flash_attention": args.monai_flash,
            "torch": torch.__version__,
            "cpu_count": os.cpu_count(),
        },
        "monai_tokens_per_s": {b: r["tokens_per_s"] for b, r in raw.get("monai", {}).items()},
        "ours_tokens_per_s": {be: {b: r["tokens_per_s"] for b, r in raw[be].items()} for be in labels},
        "speedup": {},
        "peak_memory_mb": {k: {b: r["peak_memory_mb"] for b, r in v.items()} for k, v in raw.items()},
        "seconds": {k: {b: r["seconds"] for b, r in v.items()} for k, v in raw.items()},
        "n_parameters": {k: next(iter(v.values()))["n_parameters"] for k, v in raw.items()},
    }
    if "monai" in raw:
        result["monai_decode_seconds_subtracted"] = {b: r["decode_seconds"] for b, r in raw["monai"].items()}
        result["speedup"] = {
            be: {b: raw[be][b]["tokens_per_s"] / raw["monai"][b]["tokens_per_s"] for b in raw[be]}
            for be in labels
        }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
