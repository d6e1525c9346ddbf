"""Run the BIDS validator (npm ``bids-validator`` 1.15.0, pinned in tools/package.json) from tests.

Install it with ``make tools`` (``npm ci --prefix tools``); the binary is then
``tools/node_modules/.bin/bids-validator`` (else ``bids-validator`` on ``PATH`` is used). When it is
missing, :func:`require_validator` and :func:`run_bids_validator` skip the test locally but fail it
when the ``CI`` environment variable is set (CI installs the validator).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

TOOLS_BIN = Path(__file__).resolve().parents[1] / "tools" / "node_modules" / ".bin" / "bids-validator"


def validator_path() -> str | None:
    """The validator executable: tools/node_modules/.bin first, then PATH; None if absent."""
    if TOOLS_BIN.exists() and os.access(TOOLS_BIN, os.X_OK):
        return str(TOOLS_BIN)
    return shutil.which("bids-validator")


def require_validator() -> str:
    """The validator's path; skip when absent locally, fail in CI (which installs it with `make tools`)."""
    path = validator_path()
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("bids-validator is not installed (run `make tools`)")
        pytest.skip("bids-validator not installed (run `make tools`)")
    return path


def _fmt(items: list[dict]) -> list[str]:
    """'KEY: reason [file: why; ...]' for each validator issue."""
    out = []
    for it in items:
        files = []
        for f in (it.get("files") or [])[:5]:
            where = (f.get("file") or {}).get("relativePath", "")
            why = f.get("reason") or ""
            files.append(f"{where}: {why}".strip(": ") if why and why != it.get("reason") else where)
        text = f"{it.get('key')}: {it.get('reason', '')}".strip()
        if any(files):
            text += f" [{'; '.join(x for x in files if x)}]"
        out.append(text)
    return out


def run_bids_validator(path: str | Path, timeout: float = 300.0) -> tuple[list[str], list[str]]:
    """(errors, warnings) as 'KEY: reason [files]' strings for the BIDS dataset at ``path``.

    Runs ``bids-validator --json <path>`` and parses its report; skips/fails like
    :func:`require_validator` when the validator is missing; raises AssertionError when it prints
    no JSON report.
    """
    exe = require_validator()
    proc = subprocess.run([exe, "--json", str(path)], capture_output=True, text=True, timeout=timeout)
    text = proc.stdout
    start = text.find("{")
    try:
        report = json.loads(text[start:]) if start >= 0 else None
    except json.JSONDecodeError:
        report = None
    if not isinstance(report, dict):
        raise AssertionError(f"bids-validator gave no JSON (exit {proc.returncode}): {proc.stderr[-2000:]}")
    issues = report.get("issues", {})
    return _fmt(issues.get("errors", [])), _fmt(issues.get("warnings", []))
