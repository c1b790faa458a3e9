"""Day one on a fresh box, over the loopback sshd: the managed env (built once, on top of the
test's own packages so CI never downloads TensorFlow), the preflight refusals (no TensorFlow,
a GPU TensorFlow cannot see, no data, no disk) and `orch doctor`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import Sshd, run_orch, write_config
from tests.integration.trainer_proc import status
from tests.servers import start_sshd
from trainer.contract import layout
from trainer.ml.synth import synth

pytestmark = pytest.mark.slow
# The machine's plain python3: no TensorFlow (the interpreter this test venv was made from).
BARE_PYTHON = getattr(sys, "_base_executable", None) or sys.executable
TINY = {"epochs": 2, "batch_size": 8, "hidden": 8, "attention": 4, "seed": 1}
FAKE_NVIDIA_SMI = """#!/bin/sh
case "$1" in
  -L) echo "GPU 0: NVIDIA A10G (UUID: GPU-00000000-1111-2222-3333-444444444444)" ;;
  --query-gpu=*) echo "0, NVIDIA A10G, 0, 0, 23028, 30, 20.5" ;;
  *) echo "| NVIDIA-SMI 535.104.05   Driver Version: 535.104.05   CUDA Version: 12.2 |" ;;
esac
"""


@pytest.fixture(scope="module")
def features(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("setup-features")
    synth(root, n=60, dim=8, seed=7, min_frames=4, max_frames=6)
    return root


BROKEN_NVIDIA_SMI = """#!/bin/sh
echo "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver." >&2
exit 9
"""


def box_with(tmp_path_factory: pytest.TempPathFactory, name: str, nvidia_smi: str) -> Iterator[Sshd]:
    """A machine whose PATH has this nvidia-smi (TensorFlow here is a CPU build)."""
    d = tmp_path_factory.mktemp(name)
    fake = d / "fakebin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text(nvidia_smi)
    (fake / "nvidia-smi").chmod(0o755)
    with start_sshd(d / "sshd", extra_config=f"SetEnv PATH={fake}:/usr/local/bin:/usr/bin:/bin") as server:
        yield server


@pytest.fixture(scope="module")
def gpu_box(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    """nvidia-smi lists one GPU."""
    yield from box_with(tmp_path_factory, "gpu-box", FAKE_NVIDIA_SMI)


@pytest.fixture(scope="module")
def broken_driver_box(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    """nvidia-smi is there but fails: a GPU box whose driver is not working."""
    yield from box_with(tmp_path_factory, "broken-box", BROKEN_NVIDIA_SMI)


def config(tmp_path: Path, sshd: Sshd, *, remote: dict, data: dict, **extra: object) -> Path:
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(sshd.known_hosts_line())
    return write_config(
        tmp_path / "deploy.yaml", target="ssh",
        ssh={"host": "127.0.0.1", "port": sshd.port, "user": os.environ.get("USER") or "root",
             "key_file": str(sshd.client_key), "known_hosts": str(known_hosts)},
        remote={"root": str(tmp_path / "remote"), **remote}, data=data,
        train={**TINY, "cache_dir": str(tmp_path / "cache")}, **extra)


def deployed(proc: subprocess.CompletedProcess[str]) -> dict:
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def wait_final(run_dir: Path, timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (run_dir / layout.STATUS).exists() and status(run_dir).get("state") in layout.FINAL_STATES:
            return status(run_dir)
        time.sleep(0.3)
    raise AssertionError((run_dir / layout.TRAIN_LOG).read_text()[-2000:])


def refused(proc: subprocess.CompletedProcess[str], code: int, *phrases: str) -> None:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == code, proc.stderr
    assert lines[-1].startswith("orch: error: preflight:") and "Traceback" not in proc.stderr
    for phrase in phrases:
        assert phrase in lines[-1], lines[-1]


def test_a_fresh_box_gets_a_managed_env_built_once(tmp_path: Path, sshd: Sshd, features: Path) -> None:
    assert subprocess.run([BARE_PYTHON, "-c", "import tensorflow"], capture_output=True).returncode != 0
    cfg = config(tmp_path, sshd, data={"remote_dir": str(features)},
                 remote={"env": {"base_python": BARE_PYTHON, "packages_from": sys.executable},
                         "setup": "test -f requirements.txt && command -v pip > setup-pip.txt"})
    first = run_orch("deploy", "-c", cfg, "--json")
    out = deployed(first)
    env_python = Path(out["env"]["python"])
    assert out["env"] == {"python": str(env_python), "managed": True, "built": True}
    assert env_python.parent.parent.parent == tmp_path / "remote" / "envs"
    assert "building the environment" in first.stderr  # progress shown
    assert wait_final(Path(out["run_dir"]))["state"] == "finished"  # trained by the env's Python
    code_dir = next(d for d in (tmp_path / "remote" / "code").iterdir() if d.is_dir())
    assert (code_dir / "setup-pip.txt").read_text().startswith(str(env_python.parent))  # setup ran in the env
    ready = env_python.parent.parent / ".orch-ready"
    stamp = ready.stat().st_mtime_ns
    again = deployed(run_orch("deploy", "-c", cfg, "--json"))
    assert again["env"]["built"] is False and ready.stat().st_mtime_ns == stamp  # installs nothing
    wait_final(Path(again["run_dir"]))


def test_a_failed_install_is_reported_and_never_taken_for_ready(tmp_path: Path, sshd: Sshd, features: Path) -> None:
    cfg = config(tmp_path, sshd, data={"remote_dir": str(features)},
                 remote={"env": {"base_python": BARE_PYTHON, "pip_args": ["--no-such-pip-option"]}})
    proc = run_orch("deploy", "-c", cfg)
    assert proc.returncode == 7 and "the managed environment could not be built" in proc.stderr
    assert "no such option" in proc.stderr.lower()  # the install log's tail
    assert not list((tmp_path / "remote" / "envs").glob("*/.orch-ready"))
    assert not (tmp_path / "remote" / "runs").exists()


def test_two_installs_at_once_share_one_env(tmp_path: Path) -> None:
    """Two deploys installing at once: one builds, the other waits for it and reuses it."""
    code = str(Path(__file__).resolve().parents[2])
    argv = [BARE_PYTHON, "-m", "trainer.machine", "F", "env", str(tmp_path / "envs"), "--requirements", "numpy\n",
            "--packages-from", sys.executable]
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": code})
             for _ in range(2)]
    results = [json.loads(next(line for line in p.communicate(timeout=300)[0].splitlines()
                               if line.startswith("F answer ")).removeprefix("F answer ")) for p in procs]
    assert sorted(r["built"] for r in results) == [False, True] and results[0]["python"] == results[1]["python"]


def test_an_explicit_python_without_tensorflow_is_refused(tmp_path: Path, sshd: Sshd, features: Path) -> None:
    cfg = config(tmp_path, sshd, data={"remote_dir": str(features)}, remote={"python": BARE_PYTHON})
    refused(run_orch("deploy", "-c", cfg), 12, "tensorflow", "not installed", BARE_PYTHON)
    assert not (tmp_path / "remote" / "runs").exists()


def test_a_gpu_tensorflow_cannot_see_is_refused_unless_allow_cpu(tmp_path: Path, gpu_box: Sshd,
                                                                features: Path) -> None:
    cfg = config(tmp_path, gpu_box, data={"remote_dir": str(features)}, remote={"python": sys.executable})
    refused(run_orch("deploy", "-c", cfg), 12, "TensorFlow sees no GPU although nvidia-smi lists 1",
            "training would run on the CPU", "--allow-cpu")
    assert not (tmp_path / "remote" / "runs").exists()
    out = deployed(run_orch("deploy", "-c", cfg, "--allow-cpu", "--json"))
    assert wait_final(Path(out["run_dir"]))["state"] == "finished"
    doctor = run_orch("doctor", "-c", cfg, "--json")
    checks = {c["check"]: c for c in json.loads(doctor.stdout)["checks"]}
    assert doctor.returncode == 12 and not checks["tensorflow_gpus"]["ok"]
    assert "driver 535.104.05, CUDA 12.2" in checks["gpus"]["detail"]


def test_a_broken_nvidia_driver_is_refused_unless_allow_cpu(tmp_path: Path, broken_driver_box: Sshd,
                                                            features: Path) -> None:
    cfg = config(tmp_path, broken_driver_box, data={"remote_dir": str(features)}, remote={"python": sys.executable})
    refused(run_orch("deploy", "-c", cfg), 12, "nvidia-smi is installed but fails", "couldn't communicate",
            "--allow-cpu")
    assert not (tmp_path / "remote" / "runs").exists()
    out = deployed(run_orch("deploy", "-c", cfg, "--allow-cpu", "--json"))
    assert wait_final(Path(out["run_dir"]))["state"] == "finished"


def test_a_tensorflow_that_does_not_import_is_refused(tmp_path: Path, sshd: Sshd, features: Path) -> None:
    """Installed (its metadata is there) but broken: preflight imports it for real."""
    fake = tmp_path / "broken-site"
    (fake / "tensorflow").mkdir(parents=True)
    (fake / "tensorflow" / "__init__.py").write_text("raise ImportError('libcudart.so.12: cannot open shared object')\n")
    python = tmp_path / "python-with-broken-tf"
    python.write_text(f"#!/bin/sh\nPYTHONPATH={fake}${{PYTHONPATH:+:$PYTHONPATH}} exec {sys.executable} \"$@\"\n")
    python.chmod(0o755)
    cfg = config(tmp_path, sshd, data={"remote_dir": str(features)}, remote={"python": str(python)})
    refused(run_orch("deploy", "-c", cfg), 12, "do not import", "libcudart.so.12")
    assert not (tmp_path / "remote" / "runs").exists()


def test_missing_data_names_sync_data_and_a_full_disk_is_refused(tmp_path: Path, sshd: Sshd, features: Path) -> None:
    cfg = config(tmp_path, sshd, data={"remote_dir": "data", "local_dir": str(features)},
                 remote={"python": sys.executable})
    refused(run_orch("deploy", "-c", cfg), 13, "does not exist", "`orch deploy --sync-data` uploads data.local_dir")
    assert not (tmp_path / "remote" / "runs").exists()
    big = config(tmp_path, sshd, data={"remote_dir": str(features)}, remote={"python": sys.executable,
                                                                            "min_free_gb": 1e9})
    refused(run_orch("deploy", "-c", big), 12, "GB free", "remote.min_free_gb")


def test_doctor_reports_each_check(tmp_path: Path, sshd: Sshd, features: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = config(tmp_path, sshd, data={"remote_dir": str(features)}, remote={"python": sys.executable})
    proc = run_orch("doctor", "-c", cfg, "--json")
    doc = json.loads(proc.stdout)
    assert proc.returncode == 0 and doc["ok"], proc.stdout
    assert [c["check"] for c in doc["checks"]] == ["config", "ssh", "shell", "python", "packages", "gpus", "data",
                                                   "disk", "root"]
    assert all(c["ok"] for c in doc["checks"])
    # the data counted by names, and said so (check-data, which opens them, may find fewer usable)
    assert doc["checks"][6]["detail"].startswith(f"{features}: 60 feature files labelled by their names (not opened")
    # an unknown host key fails the ssh check (doctor never trusts it) with the host key's exit
    # code, and nothing after it runs
    (tmp_path / "known_hosts").write_text("")
    proc = run_orch("doctor", "-c", cfg, "--json")
    doc = json.loads(proc.stdout)
    assert proc.returncode == 5 and doc["checks"][-1]["check"] == "ssh" and not doc["checks"][-1]["ok"]
    assert "orch trust" in doc["checks"][-1]["fix"]
    table = run_orch("doctor", "-c", cfg)
    assert table.returncode == 5 and "FAILED" in table.stdout
    # on target local no SSH is involved, and none is claimed
    local = write_config(tmp_path / "local.yaml", target="local", remote={"root": str(tmp_path / "local-root"),
                         "python": sys.executable}, data={"remote_dir": str(features)})
    doc = json.loads(run_orch("doctor", "-c", local, "--json").stdout)
    assert [c["check"] for c in doc["checks"]][:2] == ["config", "machine"] and "this computer" in doc["checks"][1][
        "detail"] and "ssh" not in [c["check"] for c in doc["checks"]]
    # missing AWS credentials: AWS's exit code, as everywhere else
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # boto3 never asks a real metadata service
    ec2 = write_config(tmp_path / "ec2.yaml", target="ec2", ec2={
        "region": "us-east-1", "instance_id": "i-0123456789abcdef0", "endpoint_url": "http://127.0.0.1:9"})
    proc = run_orch("doctor", "-c", ec2, "--json")
    assert proc.returncode == 3 and "no AWS credentials" in json.loads(proc.stdout)["checks"][-1]["detail"]
