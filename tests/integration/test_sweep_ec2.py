"""A parallel sweep on moto's EC2 (`parallel: 2`): two instances of the sweep's own, created
from ec2.launch, tagged with its name, each reused by the next trial; two trials at once; an
`orch sweep run` killed while both train, run again, follows each trial on its machine and
launches none twice; at the end both instances are stopped. Each instance is the loopback sshd
with a remote root of its own (tests/integration/sweep_machines.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from tests.integration.conftest import Sshd
from tests.integration.test_ec2_launch import an_image, aws, config
from tests.integration.test_sweep import wait_for
from tests.integration.trainer_proc import ROOT, status, trainer_env
from trainer.contract import layout
from trainer.ml.synth import synth

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sweep-ec2-data")
    synth(root, n=60, dim=8, seed=8, min_frames=4, max_frames=6)
    return root


def sweep_run(spec: Path, cfg: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "tests.integration.sweep_machines", "sweep", "run", str(spec),
                             "-c", str(cfg)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=trainer_env(), cwd=ROOT)


def training(root: Path) -> list[str]:
    """The runs training under a machine's remote root."""
    return [p.parent.name for p in root.glob(f"{layout.RUNS_DIR}/*/{layout.STATUS}")
            if status(p.parent).get("state") == "running"]


def test_a_parallel_sweep_has_two_instances_of_its_own_reuses_them_survives_a_kill_and_stops_them(
        tmp_path: Path, sshd: Sshd, data: Path, moto_endpoint: str, aws_creds: None,
        console_fingerprints: Callable) -> None:
    import optuna

    console_fingerprints(sshd.host_fingerprint)
    # ssh.host unset: each instance is reached at its own address (the harness makes it 127.0.0.1)
    cfg = config(tmp_path, sshd, data, moto_endpoint, known=True, ssh={"host": None},
                 ec2={"name": "box", "launch": {"instance_type": "g5.xlarge", "ami": an_image(moto_endpoint)}},
                 recover={"poll_seconds": 1})
    train = yaml.safe_load(cfg.read_text())["train"]
    spec = tmp_path / "par.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "par", "trials": 3, "parallel": 2, "seed": 3, "storage": f"sqlite:///{tmp_path / 'par.db'}",
        "space": {"learning_rate": {"low": 1e-4, "high": 1e-2, "log": True}}, "train": {"epochs": 30}}))
    roots = {k: Path(f"{tmp_path / 'remote'}-{k}") for k in (1, 2)}
    assert train["epochs"] == 2  # the spec's train: (30 epochs: both train at once) is what the trials get

    # Killed while both machines train a trial: two at once, each on its own instance.
    first = sweep_run(spec, cfg)
    wait_for(lambda: all(training(r) for r in roots.values()), "a trial training on each machine", first)
    os.kill(first.pid, signal.SIGKILL)
    first.communicate()

    again = sweep_run(spec, cfg)
    out, err = again.communicate(timeout=600)
    assert again.returncode == 0, err
    for k in (1, 2):
        assert f"machine {k}: trial" in err and "adopting run" in err

    study = optuna.load_study(study_name="par", storage=f"sqlite:///{tmp_path / 'par.db'}")
    trials = study.get_trials(deepcopy=False)
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3
    runs = [(t.user_attrs["machine"], t.user_attrs["run_id"]) for t in trials]
    assert len({run for _, run in runs}) == 3  # none launched twice
    for k, run in runs:  # each trial's run is on the machine the study names, and only there
        assert (roots[k] / layout.RUNS_DIR / run).is_dir() and not (roots[3 - k] / layout.RUNS_DIR / run).exists()
    assert {k for k, _ in runs} == {1, 2}  # both used, so one of them twice (3 trials)
    for root in roots.values():  # every run there is one of the study's: nothing else was launched
        assert {p.name for p in (root / layout.RUNS_DIR).iterdir()} <= {run for _, run in runs}

    instances = [i for r in aws(moto_endpoint).describe_instances()["Reservations"] for i in r["Instances"]]
    mine = {t["Value"]: i for i in instances for t in i.get("Tags", []) if t["Key"] == "Name"}
    assert sorted(n for n in mine if n.startswith("box")) == ["box-par-1", "box-par-2"]  # reused, not a third
    for name in ("box-par-1", "box-par-2"):
        tags = {t["Key"]: t["Value"] for t in mine[name]["Tags"]}
        assert tags["orch:sweep"] == "par" and tags["orch:managed"] == "true"
        assert mine[name]["State"]["Name"] == "stopped"  # after: stop, the default
