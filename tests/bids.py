"""Run the BIDS validator (npm ``bids-validator``, pinned in tools/package.json) from tests."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

TOOLS_BIN = Path(__file__).resolve().parents[1] / "tools" / "node_modules" / ".bin" / "bids-validator"


def validator_path() -> str | None:
    if TOOLS_BIN.exists():
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


def run_bids_validator(path: str | Path) -> tuple[list[str], list[str]]:
    """(errors, warnings) as 'KEY: reason' strings for the dataset at ``path``."""
    exe = require_validator()
    proc = subprocess.run([exe, "--json", str(path)], capture_output=True, text=True, timeout=300)
    try:
        report = json.loads(proc.stdout)
    except json.JSONDecodeError:
        raise AssertionError(
            f"bids-validator gave no JSON (exit {proc.returncode}): {proc.stderr[-2000:]}"
        ) from None
    issues = report.get("issues", {})

    def fmt(items: list[dict]) -> list[str]:
        out = []
        for it in items:
            files = [(f.get("file") or {}).get("relativePath", "") for f in it.get("files", [])[:3]]
            out.append(f"{it.get('key')}: {it.get('reason', '')} {files}".strip())
        return out

    return fmt(issues.get("errors", [])), fmt(issues.get("warnings", []))
