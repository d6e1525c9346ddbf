"""``synthbrain evaluate --html``: the evaluation as plots on one offline page.

:func:`write_evaluation_html` turns the result of :func:`fl_app.evaluate.fidelity.evaluate` (plus the
memorisation audit, when it ran) into one self-contained HTML file: every plot is a matplotlib PNG
embedded as a ``data:`` URL, so the file opens from ``file://`` with nothing else and no network.

Plots: measured brain-tissue fraction and CSF fraction against the requested age, one panel per
diagnosis, with the generating law's curve when the reference sites are simulated (else a straight
line fitted to the reference subjects of that diagnosis); intracranial volume by sex; diversity
(MS-SSIM of random pairs, synthetic vs real, and the feature-space MMD² against the real-vs-real
floor); the audit's nearest-neighbour distances relative to each site's threshold.
"""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["evaluation_figures", "write_evaluation_html"]

_DX_ORDER = ("CN", "MCI", "AD")
_SEX_STYLE = {"F": ("o", "tab:red"), "M": ("s", "tab:blue")}


def _png(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _arr(d: dict[str, Any], key: str) -> np.ndarray:
    return np.array([math.nan if v is None else v for v in d.get(key, [])], dtype=np.float64)


def _law_curve(key: str, dx: str, ages: np.ndarray) -> np.ndarray | None:
    try:
        from fl_app.data.simulate import generating_law
    except ImportError:
        return None
    return np.array([generating_law(float(a), "F", dx)[key] for a in ages])


def _fraction_vs_age(res: dict[str, Any], measure: str, law_key: str, label: str) -> tuple[str, str]:
    import matplotlib.pyplot as plt

    per = res["per_subject"]
    syn, ref = per["synthetic"], per.get("reference")
    dxs = [d for d in _DX_ORDER if d in set(syn["diagnosis"]) | set((ref or {}).get("diagnosis", []))]
    dxs += sorted({str(d) for d in syn["diagnosis"] if d not in _DX_ORDER and d is not None})
    if any(d is None for d in syn["diagnosis"]):
        dxs.append("n/a")
    dxs = dxs or ["n/a"]
    fig, axes = plt.subplots(1, len(dxs), figsize=(3.4 * len(dxs) + 0.6, 3.2), sharey=True, squeeze=False)
    ages_all = np.concatenate([_arr(syn, "age"), _arr(ref, "age") if ref else np.array([])])
    ages_all = ages_all[np.isfinite(ages_all)]
    lo, hi = (float(ages_all.min()), float(ages_all.max())) if ages_all.size else (40.0, 90.0)
    grid = np.linspace(lo - 1, hi + 1, 60)
    what = []
    for ax, dx in zip(axes[0], dxs, strict=True):
        want = None if dx == "n/a" else dx
        if ref:
            m = np.array([d == want for d in ref["diagnosis"]])
            a, y = _arr(ref, "age")[m], _arr(ref, measure)[m]
            ax.scatter(a, y, s=14, c="0.65", marker=".", label="real (reference)")
            ok = np.isfinite(a) & np.isfinite(y)
            if not res.get("law_compared") and ok.sum() >= 3 and np.ptp(a[ok]) > 0:
                c = np.polyfit(a[ok], y[ok], 1)
                ax.plot(grid, np.polyval(c, grid), "k--", lw=1.2, label="reference regression")
                what.append(f"{dx}: reference slope {c[0]:.2e}/y")
        if res.get("law_compared") and want in _DX_ORDER:
            curve = _law_curve(law_key, want, grid)
            if curve is not None:
                ax.plot(grid, curve, "k-", lw=1.5, label="generating law")
        m = np.array([d == want for d in syn["diagnosis"]])
        for sex, (marker, color) in _SEX_STYLE.items():
            ms = m & np.array([s == sex for s in syn["sex"]])
            ax.scatter(_arr(syn, "age")[ms], _arr(syn, measure)[ms], s=18, marker=marker, c=color,
                       alpha=0.8, label=f"synthetic {sex}")  # fmt: skip
        mo = m & np.array([s not in _SEX_STYLE for s in syn["sex"]])
        if mo.any():
            ax.scatter(_arr(syn, "age")[mo], _arr(syn, measure)[mo], s=18, marker="^", c="tab:green",
                       label="synthetic, sex n/a")  # fmt: skip
        ax.set_title(f"{dx} (n={int(m.sum())} synthetic)", fontsize=10)
        ax.set_xlabel("requested age (years)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(label)
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    cap = f"{label} measured on each synthetic subject's label map against the age it was sampled for" + (
        "; black line: the simulator's generating law (the truth the model should reproduce)."
        if res.get("law_compared")
        else "; dashed: a line fitted to the real reference subjects of that diagnosis."
        if ref
        else "."
    )
    return _png(fig), cap


def _icv_by_sex(res: dict[str, Any]) -> tuple[str, str]:
    import matplotlib.pyplot as plt

    per = res["per_subject"]
    syn, ref = per["synthetic"], per.get("reference")
    sexes = [s for s in ("F", "M") if s in set(syn["sex"]) | set((ref or {}).get("sex", []))] or ["n/a"]
    fig, ax = plt.subplots(figsize=(4.8, 3.2))
    data, labels, colors = [], [], []
    for s in sexes:
        want = None if s == "n/a" else s
        for name, d, col in (("synthetic", syn, "tab:orange"), ("real", ref, "0.6")):
            if not d:
                continue
            v = _arr(d, "icv_ml")[np.array([x == want for x in d["sex"]])]
            data.append(v[np.isfinite(v)])
            labels.append(f"{s}\n{name}")
            colors.append(col)
    pos = np.arange(1, len(data) + 1)
    if any(len(d) for d in data):
        bp = ax.boxplot(
            [d if len(d) else [np.nan] for d in data], positions=pos, widths=0.5, patch_artist=True
        )
        for patch, col in zip(bp["boxes"], colors, strict=True):
            patch.set_facecolor(col)
            patch.set_alpha(0.5)
    rng = np.random.default_rng(0)
    for p, d in zip(pos, data, strict=True):
        ax.scatter(p + rng.uniform(-0.12, 0.12, len(d)), d, s=8, c="k", alpha=0.6)
    ax.set_xticks(pos, labels)
    ax.set_ylabel("intracranial volume (ml)")
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return _png(
        fig
    ), "Intracranial volume (labels 1–3) by sex: synthetic subjects against the real reference."


def _diversity(res: dict[str, Any]) -> tuple[str, str] | None:
    import matplotlib.pyplot as plt

    ms = res.get("ms_ssim", {})
    syn = (ms.get("synthetic") or {}).get("values") or []
    real = (ms.get("reference") or {}).get("values") or []
    mmd = (res.get("distribution") or {}).get("mmd2")
    if not syn and not real and not mmd:
        return None
    fig, axes = plt.subplots(1, 2 if mmd else 1, figsize=(8.4 if mmd else 4.8, 3.2), squeeze=False)
    ax = axes[0][0]
    vals = [v for v in syn + real if v is not None]
    bins = np.linspace(min(vals, default=0.0), max(vals, default=1.0) + 1e-6, 16)
    if syn:
        ax.hist(
            [v for v in syn if v is not None],
            bins=bins,
            alpha=0.6,
            color="tab:orange",
            label="synthetic pairs",
        )
    if real:
        ax.hist([v for v in real if v is not None], bins=bins, alpha=0.6, color="0.5", label="real pairs")
    ax.set_xlabel("3D MS-SSIM of a random pair")
    ax.set_ylabel("pairs")
    ax.legend(fontsize=8)
    ax.set_title("diversity (higher = more alike)", fontsize=10)
    if mmd:
        ax2 = axes[0][1]
        names = ["synthetic vs real", "real vs real (floor)"]
        v = [mmd.get("synthetic_vs_real"), mmd.get("real_vs_real")]
        ax2.bar(names, [x if x is not None else np.nan for x in v], color=["tab:orange", "0.6"])
        ax2.set_ylabel("MMD² (features)")
        ax2.set_title("distribution distance", fontsize=10)
    fig.tight_layout()
    return _png(fig), (
        "Diversity: MS-SSIM over random pairs of synthetic subjects and of real subjects (a synthetic "
        "distribution far to the right is mode collapse, far to the left is noise); MMD² between "
        "hand-crafted feature vectors, synthetic vs real against real-half vs real-half."
    )


def _audit(res: dict[str, Any]) -> tuple[str, str] | None:
    import matplotlib.pyplot as plt

    au = res.get("audit")
    if not au or not au.get("histogram_counts"):
        return None
    edges = np.array([math.inf if e is None else e for e in au["histogram_edges_over_threshold"]], np.float64)
    counts = np.array(au["histogram_counts"], dtype=np.float64)
    if len(edges) != len(counts) + 1 or len(edges) < 2:
        return None
    if not np.isfinite(edges[-1]):  # the open last bin (≥ its left edge) drawn as a bar of width 2
        edges[-1] = edges[-2] + 2.0
    fig, ax = plt.subplots(figsize=(5.6, 3.2))
    ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color="tab:purple", alpha=0.7,
           edgecolor="k", label="synthetic subjects")  # fmt: skip
    ax.axvline(1.0, color="r", lw=1.5, label="threshold")
    ax.set_xlabel("nearest real subject distance / site threshold")
    ax.set_ylabel("synthetic subjects")
    ax.legend(fontsize=8)
    mn = au.get("min_distance_over_threshold")
    ax.set_title(f"memorisation audit: {au.get('n_flagged', 0)} flagged"
                 + (f", closest {mn:.2f}× threshold" if mn is not None else ""), fontsize=10)  # fmt: skip
    fig.tight_layout()
    return _png(fig), (
        "Memorisation audit: for every synthetic subject, the distance to its nearest real subject at "
        "each site divided by that site's threshold (summed over sites; only this histogram leaves a site). "
        "Bars left of the red line are subjects closer to a real person than the site's own subjects are "
        "to each other at the audit quantile; of those, a subject is flagged as a near copy only if it is "
        "also distinctly closer to one real subject than to any other (nearest < 2/3 of the second nearest)."
    )


def evaluation_figures(res: dict[str, Any]) -> list[tuple[str, str, str]]:
    """``[(title, base64 PNG, caption)]`` for the evaluation ``res`` (plots whose data is missing are left out)."""
    import matplotlib

    matplotlib.use("Agg")
    figs: list[tuple[str, str, str]] = []
    if "per_subject" in res:
        figs.append(("Brain-tissue fraction against age", *_fraction_vs_age(res, "btf", "brain_tissue_fraction",
                                                                          "brain-tissue fraction")))  # fmt: skip
        figs.append(("CSF fraction against age", *_fraction_vs_age(res, "csf_fraction", "csf_fraction",
                                                                 "CSF fraction")))  # fmt: skip
        figs.append(("Intracranial volume by sex", *_icv_by_sex(res)))
    div = _diversity(res)
    if div:
        figs.append(("Diversity, synthetic vs real", *div))
    aud = _audit(res)
    if aud:
        figs.append(("Memorisation audit", *aud))
    return figs


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "n/a" if v is None else str(v)


def write_evaluation_html(
    res: dict[str, Any], path: str | Path, title: str = "synthbrain evaluation"
) -> Path:
    """Write the plots page for the evaluation ``res`` to ``path`` (one self-contained file)."""
    path = Path(path)
    figs = evaluation_figures(res)
    body = "".join(
        f"<section><h2>{html.escape(t)}</h2><figure><img src='data:image/png;base64,{b64}' "
        f"alt='{html.escape(t)}'><figcaption>{html.escape(cap)}</figcaption></figure></section>"
        for t, b64, cap in figs
    )
    rows = "".join(
        f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(_fmt(v))}</td></tr>"
        for k, v in res.get("summary", {}).items()
        if not isinstance(v, (dict, list))
    )
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; max-width: 1100px; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #bbb; padding: 2px 8px; font-size: 13px; }}
figure {{ margin: 0 0 1.5em 0; }} figcaption {{ font-size: 13px; color: #333; max-width: 900px; }}
img {{ max-width: 100%; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p>{_fmt(res.get("n_synthetic"))} synthetic subjects, {_fmt(res.get("n_reference"))} real reference subjects.
Every number below is in the JSON written next to this page (<code>qc/evaluation.json</code>).</p>
{body}
<h2>Summary</h2>
<table><tr><th>metric</th><th>value</th></tr>{rows}</table>
</body></html>
"""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path
