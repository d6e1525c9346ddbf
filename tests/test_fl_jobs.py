"""The exported NVFlare job: what the recipe wires into the server and client configs (no run)."""

from __future__ import annotations

import json
from pathlib import Path

from fl_app.config import load_profile
from fl_app.fl.run import JobSpec, build_recipe


def _component(cfg: dict, path_suffix: str) -> dict:
    for part in ("workflows", "components", "executors"):
        for c in cfg.get(part, []):
            target = c.get("executor", c)
            if str(target.get("path", "")).endswith(path_suffix):
                return target
    raise AssertionError(f"{path_suffix} not in the config")


def test_exported_job_keeps_drop_out_and_memory_options(tmp_path) -> None:
    spec = JobSpec(kind="vqvae", profile=load_profile("cpu-demo").model_dump(mode="json"), num_clients=3,
                   num_rounds=4, min_sites=2, round_timeout=45, memory_gc_rounds=2,
                   checkpoint_dir=str(tmp_path / "ck"), max_steps=5, name="synthbrain-vqvae")  # fmt: skip
    build_recipe(spec).export(str(tmp_path / "jobs"))
    job = tmp_path / "jobs" / "synthbrain-vqvae"
    meta = json.loads((job / "meta.json").read_text())
    assert meta["min_clients"] == 2
    server = json.loads(next(job.rglob("config_fed_server.json")).read_text())
    ctl = _component(server, "SynthFedAvg")["args"]
    assert ctl["num_clients"] == 3 and ctl["num_rounds"] == 4
    assert ctl["min_sites"] == 2 and ctl["round_timeout"] == 45
    assert ctl["memory_gc_rounds"] == 2  # NVFlare's recipe option reaches our controller
    client = json.loads(next(job.rglob("config_fed_client.json")).read_text())
    ex = _component(client, "ClientAPIExecutor")["args"]
    assert ex["memory_gc_rounds"] == 2
    # POC / production: the site launcher runs the client script with the site's own process count
    cmd = ex["command"]
    assert cmd[cmd.index("-m") + 1] == "fl_app.fl.launcher" and cmd[cmd.index("-m") + 2].endswith("client.py")
    assert cmd[cmd.index("-m") + 3] == "vqvae"  # the job's task in the one client module
    assert cmd[cmd.index("--max-steps") + 1] == "5" and cmd[cmd.index("--rounds") + 1] == "4"


def test_job_client_is_a_module_of_the_installed_package() -> None:
    """Jobs name the client by the fl_app package (no script from the source tree): an installed,
    non-editable package can build and run a job."""
    import fl_app
    from fl_app.fl.run import CLIENT_SCRIPT

    assert CLIENT_SCRIPT.is_file() and Path(fl_app.__file__).parent in CLIENT_SCRIPT.parents
    assert CLIENT_SCRIPT.relative_to(Path(fl_app.__file__).parents[1]).with_suffix("").parts == (
        "fl_app", "fl", "client",
    )  # fmt: skip
