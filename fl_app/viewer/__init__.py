"""Offline interactive NIfTI viewer pages (NiiVue, shipped with the package) and ``synthbrain view``.

:func:`write_viewer_page` writes an HTML page that opens from ``file://`` with no server and no
network: one NiiVue viewer (axial, coronal, sagittal and a 3D render; a tissue label map as a
coloured overlay with its legend; crosshair coordinates in mm) and a list of volumes to switch
between, each shown next to its own table of facts (covariates, sidecar settings, QC results).

Used by the cohort QC report (:mod:`fl_app.generate.qc`), by ``synthbrain view`` and meant for any
other QC page, e.g. a site check's::

    from fl_app.viewer import ViewerEntry, write_viewer_page
    entries = [ViewerEntry(s.participant_id, s.image, s.label, title, {"problem": ...}) for s in subjects]
    write_viewer_page(out / "site_check.html", entries, title="site check", intro_html=table_html)

(:func:`fl_app.view.entries_for_path` makes the entries of a NIfTI file, BIDS subject or BIDS dataset.)
"""

from fl_app.viewer.page import *  # noqa: F403 (the viewer's public names, listed once in page.__all__)
from fl_app.viewer.page import __all__  # noqa: F401
