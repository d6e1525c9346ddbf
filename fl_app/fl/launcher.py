"""The site launcher: runs a job's client with the site's own process count (``compute.nproc``).

A site's YAML says how many processes it trains with (``compute.nproc``; the
site decides its hardware, the job never does). The job's client command is this launcher::

    python3 -u -m fl_app.fl.launcher custom/client.py vqvae --max-steps 50 ...

run by NVFlare's ``ClientAPIExecutor`` as an external process (:func:`recipe_launch_args`). The launcher
finds the site's YAML exactly as the client does (``$SYNTHBRAIN_SITE_CONFIG``, ``--site-config``,
``<--site-config-dir>/<site>.yaml``; the site name comes from NVFlare's trainer bootstrap file) and
replaces itself (``exec``) with either the site's installed client module, ``python -m fl_app.fl.client``
(``nproc: 1``), or ``torchrun --standalone --nproc_per_node=N --module`` of it. The copy of ``client.py``
that NVFlare puts in the job (``custom/...``) is not run: a site runs the ``fl_app`` it installed. torchrun's processes inherit NVFlare's bootstrap: rank 0 (``RANK=0``) opens
the Client API session and talks to the server; the other ranks have none (NVFlare 2.9's Cell Client
API is passive off rank 0) and get each round's task and global weights from rank 0 by broadcast
(:mod:`fl_app.train.distributed`).

DP-SGD is not combined with several processes: a site with ``privacy.enabled`` and ``compute.nproc`` > 1
is refused (:func:`check_site_parallelism`), because Opacus' per-sample clipping and the site's privacy
accounting assume one process sees the whole Poisson-sampled batch.
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
from pathlib import Path
from typing import Any

__all__ = [
    "CLIENT_MODULE",
    "LAUNCHER_MODULE",
    "check_site_parallelism",
    "launch_argv",
    "main",
    "recipe_launch_args",
]

LAUNCHER_MODULE = "fl_app.fl.launcher"
"""``python -m`` target of the site launcher (the command the jobs give NVFlare's external launch)."""
CLIENT_MODULE = "fl_app.fl.client"
"""``python -m`` target of both jobs' client."""


def check_site_parallelism(cfg: Any, world_size: int | None = None) -> None:
    """Refuse what several processes cannot do at a site: DP-SGD (``privacy.enabled``) with ``nproc`` > 1.

    Args:
        cfg: the site's :class:`~fl_app.config.SiteConfig`.
        world_size: processes actually running (default: the YAML's ``compute.nproc``).
    """
    from fl_app.config import ConfigError

    n = cfg.compute.nproc if world_size is None else world_size
    if cfg.privacy.enabled and n > 1:
        where = cfg.path or f"the YAML of site {cfg.name}"
        raise ConfigError(
            f"{where}: compute.nproc is {n} but privacy.enabled is true: local DP-SGD runs in one process "
            "only (set compute.nproc: 1 in the site YAML, or turn privacy off)"
        )


def _site_name_from_bootstrap() -> str | None:
    """The site name NVFlare wrote into the external trainer's bootstrap file (None outside NVFlare)."""
    try:
        from nvflare.client.cell.bootstrap import BOOTSTRAP_FILE_ENV_VAR, BootstrapKey, read_bootstrap_config
    except ImportError:  # pragma: no cover - nvflare is a dependency
        return None
    path = os.environ.get(BOOTSTRAP_FILE_ENV_VAR)
    if not path:
        return None
    return read_bootstrap_config(path).get(BootstrapKey.SITE_NAME)


def _site_config_for(script_args: list[str], site_name: str | None) -> Any:
    import argparse

    from fl_app.config import find_site_config, load_site_config

    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--site-config", default=None)
    p.add_argument("--site-config-dir", default=None)
    known, _ = p.parse_known_args(script_args)
    path = find_site_config(site_name or "", known.site_config, known.site_config_dir)
    return load_site_config(path)


def launch_argv(
    script: str, script_args: list[str], nproc: int, python: str | None = None, module: bool = False
) -> list[str]:
    """The command that runs ``script`` (a module if ``module``) with ``nproc`` processes (``torchrun
    --standalone`` when > 1)."""
    py = python or sys.executable
    if nproc <= 1:
        return [py, "-u", *(["-m"] if module else []), script, *script_args]
    return [
        py,
        "-u",
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        *(["--module"] if module else []),
        "--",  # the script's own options (--run ...) must not be taken as abbreviations of torchrun's
        script,
        *script_args,
    ]


def _max_nproc(site_config_dir: str | Path) -> int:
    from fl_app.config import load_site_config

    n = 1
    for p in sorted(Path(site_config_dir).glob("*.yaml")):
        if p.stem == "project":
            continue
        n = max(n, load_site_config(p).compute.nproc)
    return n


def recipe_launch_args(site_config_dir: str | Path | None) -> dict[str, Any]:
    """How a job launches its client script: keyword arguments for NVFlare's ``FedAvgRecipe``.

    * ``site_config_dir`` given (the simulator: every site's YAML is on this machine): the script runs
      inside the client (in-process) unless a site there asks for ``compute.nproc`` > 1; then every site
      goes through the launcher, with this interpreter (``sys.executable``).
    * ``site_config_dir`` None (POC, production: the sites' YAMLs are theirs alone): always the launcher,
      so each site can decide at run time; ``python3`` is the interpreter NVFlare's own startup scripts
      use at the site (``sub_start.sh``), i.e. the site's synthbrain environment.
    """
    if site_config_dir is not None:
        if _max_nproc(site_config_dir) <= 1:
            return {"launch_external_process": False}
        python = sys.executable
    else:
        python = "python3"
    return {
        "launch_external_process": True,
        "command": shlex.join([python, "-u", "-m", LAUNCHER_MODULE]),
    }


def main(argv: list[str] | None = None) -> int:
    """``python -m fl_app.fl.launcher SCRIPT [ARGS...]``: run the client module with ARGS and the site's
    ``compute.nproc`` (SCRIPT: the job's copy of ``client.py``, named by NVFlare; not run).

    Reads the site's YAML, refuses DP with several processes, exports the site's GPUs
    (``CUDA_VISIBLE_DEVICES``) and per-process threads (``OMP_NUM_THREADS``) to the processes it starts,
    then replaces itself with the script or with ``torchrun`` of it (same process group, so NVFlare stops
    every rank when it stops the trainer).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(main.__doc__)
        return 0 if args else 2
    script_args = args[1:]
    cfg = _site_config_for(script_args, _site_name_from_bootstrap())
    check_site_parallelism(cfg)
    if cfg.compute.gpus:
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", ",".join(str(g) for g in cfg.compute.gpus))
    if cfg.compute.num_threads:
        os.environ.setdefault("OMP_NUM_THREADS", str(cfg.compute.num_threads))
    cmd = launch_argv(CLIENT_MODULE, script_args, cfg.compute.nproc, module=True)
    print(
        f"synthbrain site {cfg.name}: {cfg.compute.nproc} training process(es): {shlex.join(cmd)}", flush=True
    )
    os.execv(cmd[0], cmd)
    return 0  # pragma: no cover - execv does not return


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    sys.exit(main())
