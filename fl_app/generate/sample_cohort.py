"""``synthbrain sample``: a synthetic cohort written as a BIDS derivative dataset with tissue labels.

A cohort is a list of prescribed covariates (one row per subject: age, sex, diagnosis), either drawn
from ``--n/--age/--sex/--diagnosis`` or read from ``--spec cohort.tsv``. Each subject's code grid is
sampled from the global prior under its covariates and decoded by the global VQ-VAE into a T1w image
and a tissue label map (the VQ-VAE decodes both jointly). The folder written: :mod:`fl_app.generate.cohort_folder`; the model read: :func:`fl_app.global_model.load_global_model`.

Reproducibility and resuming: the cohort is cut into fixed chunks of ``chunk_size`` subjects; chunk
``k`` is sampled in one batch from a generator seeded by :func:`chunk_seed` ``(seed, k)``. A subject's
image therefore depends only on the model, its chunk's covariates, the seed, the chunk size and the
sampling settings, never on which chunks were already written: re-running the same command skips
finished subjects (a subject is finished once its sidecar JSON, written last, exists) and re-samples
only the missing ones, bit-identically on the same device type.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fl_app import __version__
from fl_app.data.covariates import DIAGNOSES, SEXES, diagnosis_index, sex_index
from fl_app.generate.cohort_folder import (
    PROFILE_FILE,
    SAMPLING_FILE,
    CohortRow,
    grid_affine,
    is_done,
    read_withheld,
    write_dataset_files,
    write_json,
    write_participants,
    write_subject,
)
from fl_app.global_model import GlobalModel, load_global_model
from fl_app.train.common import resolve_device

__all__ = [
    "add_sample_parser",
    "chunk_seed",
    "guidance_arg",
    "make_rows",
    "parse_age",
    "read_spec",
    "sample_cohort",
]


def parse_age(text: str | None) -> float | tuple[float, float] | None:
    """``"70-80"`` -> (70, 80); ``"72"`` -> 72.0; None/"" -> None."""
    if text is None or str(text).strip() == "":
        return None
    m = re.fullmatch(r"\s*([0-9.]+)\s*(?:-|:|,)\s*([0-9.]+)\s*", str(text))
    if m:
        lo, hi = float(m.group(1)), float(m.group(2))
        if lo > hi:
            raise ValueError(f"age range {text!r}: low > high")
        return lo, hi
    return float(text)


def _label_width(n: int) -> int:
    return max(4, len(str(n)))


def make_rows(
    n: int,
    age: float | tuple[float, float] | None = None,
    sex: str | None = None,
    diagnosis: str | None = None,
    seed: int = 0,
) -> list[CohortRow]:
    """``n`` rows ``sub-synth0001`` ...; ages in a range are drawn uniformly (seeded) and rounded to
    0.1 year (the rounded age is both written and used for conditioning)."""
    if n < 1:
        raise ValueError("n must be >= 1")
    if sex is not None and sex not in SEXES:
        raise ValueError(f"sex must be one of {SEXES}, got {sex!r}")
    if diagnosis is not None and diagnosis not in DIAGNOSES:
        raise ValueError(f"diagnosis must be one of {DIAGNOSES}, got {diagnosis!r}")
    if age is None:
        ages: list[float | None] = [None] * n
    elif isinstance(age, (int, float)):
        ages = [round(float(age), 1)] * n
    else:
        rng = np.random.default_rng([int(seed), 0xA6E])
        ages = [round(float(a), 1) for a in rng.uniform(age[0], age[1], n)]
    w = _label_width(n)
    return [CohortRow(f"sub-synth{i + 1:0{w}d}", ages[i], sex, diagnosis) for i in range(n)]


def _norm_cell(v: str | None) -> str | None:
    v = (v or "").strip()
    return None if v.lower() in ("", "n/a", "na", "nan", "none", "unknown") else v


def read_spec(path: str | Path) -> list[CohortRow]:
    """Rows of a cohort spec TSV (or CSV): columns ``age``, ``sex``, ``diagnosis`` and optionally
    ``participant_id``; empty / ``n/a`` cells mean unconditional in that covariate."""
    path = Path(path)
    text = path.read_text()
    delim = "\t" if "\t" in text.splitlines()[0] else ","
    rows = list(csv.DictReader(text.splitlines(), delimiter=delim))
    if not rows:
        raise ValueError(f"{path}: no rows")
    w = _label_width(len(rows))
    out = []
    for i, r in enumerate(rows):
        r = {k.strip().lower(): v for k, v in r.items() if k}
        pid = _norm_cell(r.get("participant_id")) or f"sub-synth{i + 1:0{w}d}"
        pid = pid if pid.startswith("sub-") else f"sub-{pid}"
        if not re.fullmatch(r"sub-[A-Za-z0-9]+", pid):
            raise ValueError(f"{path} row {i + 2}: participant_id {pid!r} is not a BIDS label")
        age = _norm_cell(r.get("age"))
        sex = _norm_cell(r.get("sex"))
        dx = _norm_cell(r.get("diagnosis"))
        sex = sex.upper() if sex else None
        dx = dx.upper() if dx else None
        if sex is not None and sex not in SEXES:
            raise ValueError(f"{path} row {i + 2}: sex {sex!r} not in {SEXES}")
        if dx is not None and dx not in DIAGNOSES:
            raise ValueError(f"{path} row {i + 2}: diagnosis {dx!r} not in {DIAGNOSES}")
        out.append(CohortRow(pid, None if age is None else round(float(age), 1), sex, dx))
    if len({r.participant_id for r in out}) != len(out):
        raise ValueError(f"{path}: duplicate participant_id")
    return out


def _cond(rows: Sequence[CohortRow]) -> dict[str, torch.Tensor]:
    return {
        "age": torch.tensor([math.nan if r.age is None else r.age for r in rows], dtype=torch.float32),
        "sex": torch.tensor([sex_index(r.sex) for r in rows], dtype=torch.long),
        "diagnosis": torch.tensor([diagnosis_index(r.diagnosis) for r in rows], dtype=torch.long),
    }


def chunk_seed(seed: int, chunk: int) -> int:
    """The sampler seed of chunk ``chunk`` of a cohort with seed ``seed`` (63-bit, well mixed)."""
    state = np.random.SeedSequence([int(seed), int(chunk), 0x5EED]).generate_state(1, dtype=np.uint64)
    return int(state[0] >> np.uint64(1))


def sample_cohort(
    gm: GlobalModel,
    rows: Sequence[CohortRow],
    out: str | Path,
    seed: int = 0,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    chunk_size: int = 8,
    progress: bool = True,
    device: str | torch.device | None = None,
    precision: str = "float32",
    guidance: float | dict[str, float] = 1.0,
) -> dict[str, Any]:
    """Sample and write the cohort ``rows`` under ``out`` (see the module docstring).

    ``precision``: the prior's sampling precision (``"float32"`` or ``"bfloat16"``, see
    :func:`fl_app.generate.sampler.sample`); part of the cohort's settings like the seed, as is
    ``guidance`` (the classifier-free guidance weight, or one per covariate; 1 = none; see
    :mod:`fl_app.generate.sampler`).

    Returns ``{"written": n newly written, "skipped": n already there, "withheld": n, "seconds": s,
    "volumes_per_s": newly written / s}``. Raises ``ValueError`` if ``out`` holds a cohort sampled
    with other settings (model, seed, chunk size, sampling parameters or covariates).
    """
    from tqdm.auto import tqdm

    from fl_app.generate.sampler import normalize_guidance, sample
    from fl_app.models.vqvae import decode

    # one recorded form (the command line's); a bad weight fails here, before anything is written
    guidance = normalize_guidance(guidance)

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dev = resolve_device(str(device) if device is not None else None)
    settings = {
        "synthbrain_version": __version__,
        "model_sha256": gm.model_hash,
        "seed": int(seed),
        "chunk_size": int(chunk_size),
        "temperature": float(temperature),
        "top_k": top_k,
        "top_p": top_p,
        "precision": precision,
        "guidance": guidance,
        "device_type": dev.type,
        "subjects": [asdict(r) for r in rows],
    }
    sfile = out / SAMPLING_FILE
    if sfile.is_file():
        old = json.loads(sfile.read_text())
        old.setdefault("precision", "float32")  # cohorts written before the options existed
        old.setdefault("guidance", 1.0)
        diff = [k for k in settings if k not in ("synthbrain_version",) and old.get(k) != settings[k]]
        if diff:
            raise ValueError(
                f"{out} already holds a cohort sampled with different {', '.join(diff)}; "
                "use another --out (or delete it) to sample a new cohort"
            )
    write_json(sfile, settings)
    from fl_app.config import profile_to_yaml

    (out / PROFILE_FILE).write_text(profile_to_yaml(gm.profile))
    write_dataset_files(out, gm, rows)
    withheld = read_withheld(out)
    affine = grid_affine(gm.profile)
    todo_chunks = []
    for k in range(0, len(rows), chunk_size):
        chunk = rows[k : k + chunk_size]
        if any(not is_done(out, r.participant_id) and r.participant_id not in withheld for r in chunk):
            todo_chunks.append(k // chunk_size)
    n_done = sum(is_done(out, r.participant_id) or r.participant_id in withheld for r in rows)
    written = 0
    t0 = time.perf_counter()
    bar = tqdm(total=len(rows), initial=n_done, unit="vol", desc="sampling", disable=not progress)
    try:
        for c in todo_chunks:
            chunk = list(rows[c * chunk_size : (c + 1) * chunk_size])
            cs = chunk_seed(seed, c)
            codes = sample(
                gm.prior,
                len(chunk),
                cond=_cond(chunk),
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                seed=cs,
                batch_size=len(chunk),
                progress=False,
                device=dev,
                precision=precision,
                guidance=guidance,
            )
            image, logits = decode(gm.vqvae, codes.to(dev))
            image = image.float().cpu().numpy()
            labels = None if logits is None else logits.argmax(1).to(torch.uint8).cpu().numpy()
            for j, r in enumerate(chunk):
                if is_done(out, r.participant_id) or r.participant_id in withheld:
                    continue
                meta = {
                    "Seed": int(seed),
                    "Chunk": c,
                    "ChunkSeed": cs,
                    "IndexInChunk": j,
                    "ChunkSize": int(chunk_size),
                    "Temperature": float(temperature),
                    "TopK": top_k,
                    "TopP": top_p,
                    "Guidance": guidance,
                    "Covariates": {"age": r.age, "sex": r.sex, "diagnosis": r.diagnosis},
                    "ModelSha256": gm.model_hash,
                }
                write_subject(out, r, image[j, 0], None if labels is None else labels[j], affine, meta)
                written += 1
                bar.update(1)
            write_participants(out, rows)
    finally:
        bar.close()
    write_participants(out, rows)
    secs = time.perf_counter() - t0
    return {
        "written": written,
        "skipped": n_done,
        "withheld": len(withheld),
        "seconds": secs,
        "volumes_per_s": written / secs if written and secs > 0 else None,
        "device": str(dev),
    }


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def _run_sample(args: argparse.Namespace) -> int:
    from fl_app.evaluate.audit import load_site_audit

    try:
        gm = load_global_model(args.model, args.vqvae, args.prior, device=args.device)
        if args.spec:
            rows = read_spec(args.spec)
        else:
            rows = make_rows(args.n, parse_age(args.age), args.sex, args.diagnosis, args.seed)
        # the sites' audit results are read before sampling: a bad file fails at once, not after the run
        audits = [load_site_audit(p) for p in args.audit_site or []]
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"model sha256:{gm.model_hash[:16]}…  profile {gm.profile.name} "
        f"{'x'.join(map(str, gm.profile.data.shape))} @ {gm.profile.data.spacing[0]:g} mm, "
        f"ε={gm.max_epsilon if gm.max_epsilon is not None else 'n/a'}; {len(rows)} subjects -> {args.out}",
        flush=True,
    )
    try:
        res = sample_cohort(
            gm,
            rows,
            args.out,
            seed=args.seed,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            chunk_size=args.batch_size,
            progress=not args.quiet,
            device=args.device,
            precision=args.precision,
            guidance=args.guidance,
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    rate = f", {res['volumes_per_s']:.2f} volumes/s on {res['device']}" if res["volumes_per_s"] else ""
    print(f"wrote {res['written']} subjects ({res['skipped']} already there){rate}")
    status = 0
    if args.audit_site or args.audit_against:
        from fl_app.evaluate.audit import gate_cohort

        status = gate_cohort(
            args.out, gm.profile, audits, args.audit_against, args.audit_quantile, args.no_gate
        )
    if not args.no_qc:
        from fl_app.generate.qc import write_qc

        report = write_qc(args.out, progress=not args.quiet)
        print(f"QC report: {report}")
    return status


def guidance_arg(text: str) -> float | dict[str, float]:
    """argparse ``type`` of ``--guidance`` (:func:`fl_app.generate.sampler.parse_guidance`)."""
    from fl_app.generate.sampler import parse_guidance

    try:
        return parse_guidance(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def add_sample_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``synthbrain sample`` to an argparse subparsers object."""
    p = subparsers.add_parser(
        "sample",
        help="sample a synthetic cohort (BIDS derivative: T1w + tissue labels) from a global model",
        description=(
            "Sample a synthetic cohort with prescribed covariates from a trained model and write it as a "
            "BIDS derivative dataset (T1w + dseg tissue labels, participants.tsv, sidecars) with a QC "
            "report. Re-running the same command resumes (finished subjects are skipped)."
        ),
    )
    src = p.add_argument_group("model")
    src.add_argument("--model", help="global model dir (vqvae.pt + prior.pt + model_card.json)")
    src.add_argument("--vqvae", help="vqvae.pt (or its run dir); overrides --model's")
    src.add_argument("--prior", help="prior.pt (or its run dir); overrides --model's")
    cov = p.add_argument_group("covariates")
    cov.add_argument("--n", type=int, default=10, help="number of subjects (default 10)")
    cov.add_argument("--age", help="age or range, e.g. 72 or 70-80 (uniform); omit = unconditional")
    cov.add_argument("--sex", choices=SEXES, help="F or M; omit = unconditional")
    cov.add_argument("--diagnosis", choices=DIAGNOSES, help="CN, MCI or AD; omit = unconditional")
    cov.add_argument("--spec", help="TSV/CSV with one row per subject: [participant_id] age sex diagnosis")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output BIDS derivative folder")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument(
        "--guidance",
        type=guidance_arg,
        default=1.0,
        help="classifier-free guidance weight: 1 = plain conditional sampling, >1 follows the covariates "
        "more strongly (twice the sampling work); or one weight per covariate, e.g. age=3,sex=5,diagnosis=5 "
        "(up to 4x the work)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=8,
        help="subjects per sampling chunk (part of the seed: keep it to resume)",
    )
    p.add_argument("--device", default="auto", help="auto (GPU when there is one), cpu, cuda, cuda:1 ...")
    p.add_argument(
        "--precision",
        choices=["float32", "bfloat16"],
        default="float32",
        help="prior sampling precision: float32 (exact) or bfloat16 (fewer bytes per token: faster; see docs/BENCHMARKS.md)",
    )
    gate = p.add_argument_group("memorisation audit gate")
    gate.add_argument(
        "--audit-site", nargs="+", metavar="JSON", help="site audit results (synthbrain audit-site)"
    )
    gate.add_argument(
        "--audit-against", nargs="+", metavar="BIDS", help="run the per-site audit here on these BIDS sites"
    )
    gate.add_argument(
        "--audit-quantile", type=float, default=0.05, help="site threshold quantile (default 0.05)"
    )
    gate.add_argument("--no-gate", action="store_true", help="keep flagged subjects (exit 1 instead)")
    p.add_argument("--no-qc", action="store_true", help="skip montages and the HTML report")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_sample)
    return p
