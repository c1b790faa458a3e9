"""Machines whose shells talk: a login shell that prints before every command (a ~/.bashrc
greeting before its interactive guard, a noisy ~/.zshenv), with or without a final newline,
and the other login shells users have (zsh, fish, dash). Each is a real sshd whose
ForceCommand prints the noise, then runs the command with that shell: exactly what sshd does
with a user's login shell and its start-up files. Every command keeps working; doctor warns."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import run_orch, write_config
from tests.servers import Sshd, start_sshd
from trainer.contract import layout
from trainer.ml.synth import synth

pytestmark = pytest.mark.slow
NOISE = "Welcome to the GPU box! Today's tip: nvidia-smi -l 1\nno newline at the end of this"
SHELLS = [s for s in ("bash", "zsh", "fish", "dash") if shutil.which(s)]


def noisy_shell(folder: Path, shell: str) -> Path:
    script = folder / f"noisy-{shell}"
    script.write_text(f"#!/bin/sh\nprintf '%s' {json.dumps(NOISE)}\nexec {shutil.which(shell)} -c "
                      '"$SSH_ORIGINAL_COMMAND"\n')
    script.chmod(0o755)
    return script


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The login's home folder on the machine (sshd's SetEnv: never the real one of this user)."""
    return tmp_path_factory.mktemp("noisy-home")


@pytest.fixture(scope="module")
def noisy(tmp_path_factory: pytest.TempPathFactory, home: Path) -> Iterator[dict[str, Sshd]]:
    servers: dict[str, Sshd] = {}
    stack = []
    for shell in SHELLS:
        folder = tmp_path_factory.mktemp(f"sshd-{shell}")
        ctx = start_sshd(folder, extra_config=f"ForceCommand {noisy_shell(folder, shell)}\nSetEnv HOME={home}")
        servers[shell] = ctx.__enter__()
        stack.append(ctx)
    yield servers
    for ctx in reversed(stack):
        ctx.__exit__(None, None, None)


@pytest.fixture(scope="module")
def site(noisy: dict[str, Sshd], home: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """One machine (one remote.root), reached through every noisy shell; a run trained there."""
    work = tmp_path_factory.mktemp("noisy")
    synth(work / "local-data", n=120, dim=8, seed=3, min_frames=4, max_frames=8)
    configs = {shell: config(work, shell, sshd) for shell, sshd in noisy.items()}
    proc = run_orch("deploy", "--sync-data", "--json", "--follow", "-c", configs["bash"], "--", "--epochs", "2")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    launched = json.loads(proc.stdout[: proc.stdout.index("\n}") + 2])
    return {"configs": configs, "run_id": launched["run_id"], "work": work, "home": home}


def config(work: Path, shell: str, sshd: Sshd) -> Path:
    known = work / f"known_hosts-{shell}"
    known.write_text(sshd.known_hosts_line())
    return write_config(
        work / f"deploy-{shell}.yaml", target="ssh",
        ssh={"host": "127.0.0.1", "port": sshd.port, "user": os.environ.get("USER") or "root",
             "key_file": str(sshd.client_key), "known_hosts": str(known)},
        # Relative to the login's home, as the documented default: $HOME is asked, never read from noise.
        remote={"root": "audio_emotion", "python": os.sys.executable},
        data={"remote_dir": "data", "local_dir": str(work / "local-data")},
        train={"batch_size": 8, "hidden": 8, "attention": 4, "seed": 1, "patience": 0,
               "cache_dir": str(work / "cache")})


@pytest.mark.parametrize("shell", SHELLS)
def test_every_command_works_through_a_noisy_shell(site: dict[str, object], shell: str, tmp_path: Path) -> None:
    cfg, run_id = site["configs"][shell], site["run_id"]  # type: ignore[index]
    runs = run_orch("runs", "--json", "-c", cfg)
    assert runs.returncode == 0 and run_id in [r["run_id"] for r in json.loads(runs.stdout)], runs.stderr
    snap = run_orch("monitor", run_id, "--json", "-c", cfg)
    assert snap.returncode == 0 and json.loads(snap.stdout)["state"] == "finished", snap.stderr
    logs = run_orch("logs", run_id, "-c", cfg)
    assert logs.returncode == 0 and "finished: best val_accuracy" in logs.stdout and "Welcome" not in logs.stdout
    got = run_orch("download", run_id, "--dest", tmp_path / "dl", "--json", "-c", cfg)
    assert got.returncode == 0, got.stderr
    assert layout.BEST_WEIGHTS in json.loads(got.stdout)["fetched"]
    st = run_orch("status", "--json", "-c", cfg)
    assert st.returncode == 0 and run_id in [r["run_id"] for r in json.loads(st.stdout)["machine"]["runs"]], st.stderr
    # The whole deploy path (sync, env, preflight, launch, start check) through this shell too,
    # and a stop; the run need not train.
    again = run_orch("deploy", "--sync-data", "--json", "-c", cfg, "--", "--epochs", "1")
    assert again.returncode == 0 and "0 new or changed files" in again.stderr, again.stderr  # nothing changed
    stopped = run_orch("stop", json.loads(again.stdout)["run_id"], "--json", "-c", cfg)
    assert json.loads(stopped.stdout)["alive"] is False, stopped.stderr


@pytest.mark.parametrize("shell", SHELLS[:1])
def test_doctor_warns_about_the_noise(site: dict[str, object], shell: str) -> None:
    proc = run_orch("doctor", "--json", "-c", site["configs"][shell])  # type: ignore[index]
    checks = {c["check"]: c for c in json.loads(proc.stdout)["checks"]}
    shell_check = checks["shell"]
    assert shell_check["ok"] and shell_check["warning"] and "Welcome" in shell_check["detail"]
    assert "interactive" in shell_check["fix"]
    made = sorted(p.name for p in site["home"].iterdir() if not p.name.startswith("."))  # type: ignore[union-attr]
    assert made == ["audio_emotion"]  # no folder named after the greeting
