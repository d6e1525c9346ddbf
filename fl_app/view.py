"""``synthbrain view PATH``: any NIfTI file, BIDS subject, BIDS dataset or synthbrain cohort in the offline
viewer (:mod:`fl_app.viewer`). A command module above the data, generation and viewer layers: the viewer itself
imports none of them."""

from __future__ import annotations

import argparse
import html
import sys
from pathlib import Path
from typing import Any

from fl_app.viewer.page import (
    ViewerEntry,
    _fmt,
    _header_facts,
    _is_nifti,
    _is_synthbrain_cohort,
    _sibling_dseg,
    _sidecar,
    _stem,
    write_viewer_page,
)

__all__ = ["add_view_parser", "entries_for_path"]


def entries_for_path(path: str | Path, labels: str | Path | None = None) -> list[ViewerEntry]:
    """Viewer entries for a NIfTI file, a BIDS subject folder or a BIDS dataset / synthbrain cohort."""
    from fl_app.data.cohort import read_bids

    path = Path(path)
    if _is_nifti(path):
        lab = Path(labels) if labels else _sibling_dseg(path)
        facts = _header_facts(path) | ({"labels": lab.name} if lab else {}) | _sidecar(path)
        return [ViewerEntry(_stem(path), path, lab, _stem(path), facts)]
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: not a NIfTI file or a folder")
    if path.name.startswith("sub-"):
        root, only = path.parent, path.name
    else:
        root, only = path, None
    out: list[ViewerEntry] = []
    if (root / "participants.tsv").is_file():
        for s in read_bids(root):
            if s.image is None or (only and s.participant_id != only):
                continue
            lab = s.label or _sibling_dseg(s.image)
            facts = {"participant_id": s.participant_id, "age": s.age, "sex": s.sex, "diagnosis": s.diagnosis}
            facts |= _header_facts(s.image) | _sidecar(s.image)
            title = f"{s.participant_id}: {_fmt(s.age)} y, {_fmt(s.sex)}, {_fmt(s.diagnosis)}"
            out.append(ViewerEntry(s.participant_id, s.image, lab, title, facts))
    if not out:  # a subject folder without a BIDS root, or any folder of NIfTI files
        for img in sorted(path.rglob("*.nii*")):
            if _is_nifti(img) and not _stem(img).endswith("_dseg"):
                lab = _sibling_dseg(img)
                out.append(ViewerEntry(_stem(img), img, lab, _stem(img), _header_facts(img) | _sidecar(img)))
    if not out:
        raise FileNotFoundError(f"{path}: no NIfTI image found")
    return out


def _run_view(args: argparse.Namespace) -> int:
    import tempfile

    path = Path(args.path)
    try:
        if path.is_dir() and _is_synthbrain_cohort(path) and not args.out:
            from fl_app.generate.qc import write_qc

            page = write_qc(path, progress=not args.quiet and sys.stderr.isatty())
        else:
            entries = entries_for_path(path, args.labels)
            out = (
                Path(args.out)
                if args.out
                else Path(tempfile.mkdtemp(prefix="synthbrain-view-"))
                / f"{_stem(path) if _is_nifti(path) else path.name}.html"
            )
            page = write_viewer_page(
                out,
                entries,
                title=f"synthbrain view: {path.name}",
                intro_html=f"<h1>{html.escape(path.name)}</h1><p>{len(entries)} volume(s) from "
                f"<code>{html.escape(str(path.resolve()))}</code>.</p>",
                progress=not args.quiet and sys.stderr.isatty(),
            )
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(page.resolve())
    if args.open:
        import webbrowser

        try:
            webbrowser.get()
        except webbrowser.Error:
            print("no browser found here: open the page above in one", file=sys.stderr)
            return 0
        webbrowser.open(page.resolve().as_uri())
    return 0


def add_view_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``synthbrain view`` to an argparse subparsers object."""
    p = subparsers.add_parser(
        "view",
        help="open a NIfTI file, BIDS subject or cohort in the offline 3D viewer",
        description="Writes an offline viewer page (NiiVue, no network) for PATH and prints its path. PATH: a "
        "NIfTI file (its sibling *_dseg label map, if any, overlaid), a BIDS subject folder, a BIDS dataset, "
        "or a synthbrain cohort (its qc/report.html is refreshed).",
    )
    p.add_argument("path", help="NIfTI file, BIDS subject folder, BIDS dataset or synthbrain cohort")
    p.add_argument("--labels", help="label map NIfTI to overlay on a single NIfTI image")
    p.add_argument(
        "--out", help="write the page here (default: a new temporary folder; cohort: qc/report.html)"
    )
    p.add_argument("--open", action="store_true", help="also open the page in the system browser")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_view)
    return p
