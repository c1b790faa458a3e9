"""`orch download` against crafted runs, kills and a full disk, over the loopback sshd:
nothing is ever written outside DEST/<run_id>/, and nothing an interruption leaves behind
survives the next download."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.config import load_config
from orchestrator.context import Context
from tests.integration.conftest import Sshd, run_orch, write_config
from tests.integration.trainer_proc import signal_ended, trainer_env
from tests.servers import small_disk
from trainer.contract import layout
from trainer.machine.proc import pid_line

pytestmark = pytest.mark.slow

BEST = layout.BEST_WEIGHTS
CLASSES = layout.stats_path(layout.CLASSES_JSON)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_run(remote: Path, run_id: str, files: dict[str, bytes], *, state: str = "finished", best: float = 0.5,
             manifest: str | None = None, pid: str | None = None) -> Path:
    """A run folder as the trainer leaves it (a manifest of every file, unless given)."""
    run_dir = remote / layout.RUNS_DIR / run_id
    for rel, data in files.items():
        (run_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        (run_dir / rel).write_bytes(data)
    (run_dir / layout.STATUS).write_text(json.dumps({"state": state, "best_val_accuracy": best, "epoch": 3,
                                                     "epochs": 3}))
    if pid is not None:
        (run_dir / layout.PID_FILE).write_text(pid)
    if manifest is None:
        manifest = "".join(layout.manifest_line(sha(data), rel) + "\n" for rel, data in files.items())
    (run_dir / layout.MANIFEST).write_text(manifest)
    return run_dir


def normal_files(best_size: int = 4096) -> dict[str, bytes]:
    return {layout.RUN_JSON: b'{"config": {}}', CLASSES: b'["a", "b"]', BEST: os.urandom(best_size)}


@pytest.fixture
def site(tmp_path: Path, sshd: Sshd) -> dict[str, Path]:
    """A config for the loopback sshd, its remote root with one honest finished run, a DEST."""
    (tmp_path / "known_hosts").write_text(sshd.known_hosts_line())
    remote = tmp_path / "remote"
    make_run(remote, "honest", normal_files(), best=0.5)
    cfg = write_config(
        tmp_path / "deploy.yaml", target="ssh",
        ssh={"host": "127.0.0.1", "port": sshd.port, "user": os.environ.get("USER") or "root",
             "key_file": str(sshd.client_key), "known_hosts": str(tmp_path / "known_hosts")},
        remote={"root": str(remote), "python": sys.executable})
    return {"cfg": cfg, "remote": remote, "dest": tmp_path / "dest", "outside": tmp_path / "outside",
            "tmp": tmp_path}


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


# --------------------------------------------------------------------------- crafted runs

def crafted(site: dict[str, Path], case: str) -> str:
    """A run claiming the best accuracy whose manifest tries ``case``; returns what stderr must say."""
    remote, outside = site["remote"], site["outside"]
    files = normal_files()
    lines = [layout.manifest_line(sha(data), rel) for rel, data in files.items()]
    payload = b"pwned\n"
    run_dir = remote / layout.RUNS_DIR / "evil"
    if case == "absolute":
        # the remote path <run>//abs exists, so the old code fetched it and wrote it to /abs
        target = outside / "absolute"
        (run_dir / str(target).lstrip("/")).parent.mkdir(parents=True)
        (run_dir / str(target).lstrip("/")).write_bytes(payload)
        lines.append(layout.manifest_line(sha(payload), str(target)))
    elif case in ("dotdot", "dotdot inside"):
        # DEST/evil/../../outside/x is <tmp>/outside/x; on the machine it names <remote>/outside/x
        (remote / "outside").mkdir(parents=True)
        (remote / "outside" / "x").write_bytes(payload)
        rel = "../../outside/x" if case == "dotdot" else "stats/../../../outside/x"
        lines.append(layout.manifest_line(sha(payload), rel))
    elif case == "empty part":
        lines.append(layout.manifest_line(sha(files[CLASSES]), "stats//classes.json"))
    elif case == "dot part":
        lines.append(layout.manifest_line(sha(files[CLASSES]), "./stats/classes.json"))
    elif case == "path through a remote link":
        secret = remote / "elsewhere" / "secret.txt"
        secret.parent.mkdir(parents=True)
        secret.write_bytes(payload)
        run_dir.mkdir(parents=True)
        (run_dir / "linked").symlink_to(secret.parent)
        lines.append(layout.manifest_line(sha(payload), "linked/secret.txt"))
    elif case == "remote file is a link":
        run_dir.mkdir(parents=True)
        (remote / "secret.txt").write_bytes(payload)
        (run_dir / "stolen.txt").symlink_to(remote / "secret.txt")
        lines.append(layout.manifest_line(sha(payload), "stolen.txt"))
    elif case == "entry is a folder":
        lines.append(layout.manifest_line(sha(b""), "stats"))
    elif case == "file and folder":
        lines.append(layout.manifest_line(sha(files[BEST]), "checkpoints"))
    elif case == "huge number of entries":
        lines += [layout.manifest_line(sha(b"%d" % i), f"stats/f{i}") for i in range(200_000)]
    elif case == "malformed line":
        lines.append("this is not a manifest line")
    elif case == "control character":
        lines.append(layout.manifest_line(sha(payload), "stats/\x1b[2Jx"))
    elif case == "local link out of DEST":
        outside.mkdir()
        (site["dest"] / "evil").mkdir(parents=True)
        (site["dest"] / "evil" / "stats").symlink_to(outside)
    make_run(remote, "evil", files, best=0.99, manifest="\n".join(lines) + "\n")
    return "run evil looks corrupt"


CASES = ["absolute", "dotdot", "dotdot inside", "empty part", "dot part", "path through a remote link",
         "remote file is a link", "entry is a folder", "file and folder", "huge number of entries",
         "malformed line", "control character", "local link out of DEST"]


@pytest.mark.parametrize("case", CASES)
def test_a_crafted_run_claiming_the_best_accuracy_writes_nothing(site: dict[str, Path], case: str) -> None:
    expected = crafted(site, case)
    before_dest, before_outside = tree(site["dest"]), tree(site["outside"])
    proc = run_orch("download", "-c", site["cfg"], "--dest", site["dest"])  # plain download picks the "best" run
    assert proc.returncode == 7, proc.stderr
    assert proc.stderr.count("\n") == 1 and expected in proc.stderr, proc.stderr
    assert "\x1b" not in proc.stderr  # a crafted name never reaches the terminal raw
    assert tree(site["dest"]) == before_dest  # nothing written, not even a folder
    assert tree(site["outside"]) == before_outside


def test_the_run_argument_is_checked_before_any_folder_is_created(site: dict[str, Path]) -> None:
    victim = site["tmp"] / "victim"
    for arg in (str(victim), "../victim", "a/b", "-x", "a b"):
        proc = run_orch("download", "-c", site["cfg"], "--dest", site["dest"], "--", arg)
        assert proc.returncode == 2 and "run id" in proc.stderr, (arg, proc.stderr)
    missing = run_orch("download", "nosuch", "-c", site["cfg"], "--dest", site["dest"])
    assert missing.returncode == 2 and "no run 'nosuch'" in missing.stderr
    assert not victim.exists() and not site["dest"].exists()
    # a unique prefix of a real id is resolved on the machine, then downloaded under the full id
    got = run_orch("download", "hon", "-c", site["cfg"], "--dest", site["dest"], "--json")
    assert got.returncode == 0, got.stderr
    assert json.loads(got.stdout)["run_id"] == "honest" and (site["dest"] / "honest" / BEST).is_file()


def test_dest_that_is_a_file_is_a_usage_error(site: dict[str, Path]) -> None:
    site["dest"].write_text("a file")
    for dest in (site["dest"], site["dest"] / "below"):
        proc = run_orch("download", "-c", site["cfg"], "--dest", dest)
        assert proc.returncode == 2 and "not a folder" in proc.stderr, proc.stderr
    assert site["dest"].read_text() == "a file"


# --------------------------------------------------------------------------- live, died, finished

def test_a_live_run_that_replaces_its_best_mid_transfer_is_fetched_again(site: dict[str, Path],
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from orchestrator.context import Context, Output
    from orchestrator.download import MachineSource, download

    files = normal_files()
    old_best = os.urandom(4096)
    # The trainer replaced best.weights.h5 and has not rewritten the manifest yet (a live run
    # lists no status.json nor metrics.jsonl in it).
    stale = "".join(layout.manifest_line(sha(old_best if rel == BEST else data), rel) + "\n"
                    for rel, data in files.items())
    run_dir = make_run(site["remote"], "live", files, state="running", best=0.99, manifest=stale,
                       pid=pid_line(os.getpid()))
    fetches: list[str] = []
    original = MachineSource.fetch

    def fetch(self, run_id, rel, local, progress=None, size=None):  # the trainer commits its manifest meanwhile
        fetches.append(rel)
        digest = original(self, run_id, rel, local, progress, size)
        if rel == BEST:
            (run_dir / layout.MANIFEST).write_text(
                "".join(layout.manifest_line(sha(data), rel) + "\n" for rel, data in files.items()))
        return digest

    monkeypatch.setattr(MachineSource, "fetch", fetch)
    output = Output.captured()
    got = download(Context(load_config(site["cfg"]), output), "live", dest=site["dest"])
    assert sorted(got.fetched) == sorted(files) and (site["dest"] / "live" / BEST).read_bytes() == files[BEST]
    assert fetches.count(BEST) == 2 and "again" in output.err.file.getvalue()


def test_a_live_run_between_two_bests_is_read_again(site: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    from orchestrator.context import Context
    from orchestrator.download import MachineSource, download

    files = normal_files()
    without_best = "".join(layout.manifest_line(sha(data), rel) + "\n" for rel, data in files.items() if rel != BEST)
    run_dir = make_run(site["remote"], "live", files, state="running", best=0.99, manifest=without_best,
                       pid=pid_line(os.getpid()))
    original, asked = MachineSource.files, []

    def listed(self, run_id):  # the trainer puts best.weights.h5 back into its manifest meanwhile
        got = original(self, run_id)
        asked.append(run_id)
        (run_dir / layout.MANIFEST).write_text(
            "".join(layout.manifest_line(sha(data), rel) + "\n" for rel, data in files.items()))
        return got

    monkeypatch.setattr(MachineSource, "files", listed)
    got = download(Context(load_config(site["cfg"])), "live", dest=site["dest"])
    assert len(asked) == 2 and BEST in got.fetched
    assert (site["dest"] / "live" / BEST).read_bytes() == files[BEST]


def test_a_finished_run_without_a_best_checkpoint_is_refused(site: dict[str, Path]) -> None:
    files = {layout.RUN_JSON: b"{}"}
    make_run(site["remote"], "nobest", files, state="failed")
    proc = run_orch("download", "nobest", "-c", site["cfg"], "--dest", site["dest"])
    assert proc.returncode == 2 and "run nobest has no best checkpoint" in proc.stderr, proc.stderr
    assert not site["dest"].exists()


@pytest.mark.parametrize("state, pid, hint", [("finished", None, "changed or damaged"),
                                              ("running", "999999 1\n", "orch resume died --continue")])
def test_a_mismatch_of_a_run_that_is_not_live_is_reported_at_once(site: dict[str, Path], state: str,
                                                                  pid: str | None, hint: str) -> None:
    files = normal_files()
    bad = "".join(layout.manifest_line(sha(b"other" if rel == BEST else data), rel) + "\n"
                  for rel, data in files.items())
    make_run(site["remote"], "died", files, state=state, manifest=bad, pid=pid)
    start = time.monotonic()
    proc = run_orch("download", "died", "-c", site["cfg"], "--dest", site["dest"])
    assert proc.returncode == 7 and f"{BEST}: checksum mismatch" in proc.stderr and hint in proc.stderr
    assert time.monotonic() - start < 20 and "again" not in proc.stderr  # no retries
    assert not list(site["dest"].rglob("*.part-*")) and not (site["dest"] / "died" / BEST).exists()


def test_a_died_run_downloads(site: dict[str, Path]) -> None:
    files = normal_files()  # the live-run manifest: no status.json, no metrics.jsonl
    make_run(site["remote"], "died", files, state="running", pid="999999 1\n")
    (site["remote"] / layout.RUNS_DIR / "died" / layout.METRICS).write_text('{"epoch": 1}\n')
    proc = run_orch("download", "died", "-c", site["cfg"], "--dest", site["dest"], "--json")
    assert proc.returncode == 0, proc.stderr
    assert sorted(json.loads(proc.stdout)["fetched"]) == sorted(files)


# --------------------------------------------------------------------------- interruptions

def _procs() -> Iterator[tuple[int, list[str]]]:
    for d in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            yield int(d.name), (d / "cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]


def remote_senders(root: Path) -> list[int]:
    """The machine side of a download from ``root`` (the `send` verb, the sshd session's command)."""
    return [pid for pid, argv in _procs() if argv[-3:-1] == ["send", str(root)]]


def ssh_clients(root: Path) -> list[int]:
    """The OpenSSH clients of a download from ``root``."""
    return [pid for pid, argv in _procs() if argv[:1] == ["ssh"] and f" send {root} " in argv[-1]]


def size_of(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def wait_for(cond, timeout: float = 30.0):  # noqa: ANN001, ANN201
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(0.01)
    raise AssertionError("timed out")


BIG = 1 << 30  # a sparse GiB: seconds to send over loopback, nothing to store on the machine


def sparse_best(run_dir: Path) -> None:
    """Make the run's best checkpoint a sparse GiB of zeros (and its manifest say so)."""
    with open(run_dir / BEST, "wb") as fh:
        fh.truncate(BIG)
    lines = [line for line in (run_dir / layout.MANIFEST).read_text().splitlines() if not line.endswith(BEST)]
    (run_dir / layout.MANIFEST).write_text("\n".join([*lines, layout.manifest_line(zeros_digest(), BEST)]) + "\n")


@functools.cache
def zeros_digest() -> str:
    """The sha256 of BIG zero bytes (seconds of CPU: worked out once)."""
    h, zeros = hashlib.sha256(), bytes(1 << 20)
    for _ in range(BIG >> 20):
        h.update(zeros)
    return h.hexdigest()


@contextlib.contextmanager
def stalled_download(site: dict[str, Path]) -> Iterator[tuple[subprocess.Popen[str], Path, list[int]]]:
    """`orch download` of a large best checkpoint, stalled mid-transfer (its machine side is
    SIGSTOPped once bytes have arrived), so that a kill lands in the middle for sure."""
    run_dir = make_run(site["remote"], "big", normal_files(), best=0.9)
    sparse_best(run_dir)
    orch = subprocess.Popen([sys.executable, "-m", "orchestrator", "download", "big", "-c", str(site["cfg"]),
                             "--dest", str(site["dest"])], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=trainer_env())
    cats: list[int] = []
    try:
        part = wait_for(lambda: [p for p in (site["dest"] / "big" / "checkpoints").glob(".best.weights.h5.part-*")
                                 if size_of(p) > 0])[0]
        cats += wait_for(lambda: remote_senders(site["remote"]))
        for pid in cats:
            os.kill(pid, signal.SIGSTOP)
        yield orch, part, cats
    finally:
        for pid in cats:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
                os.kill(pid, signal.SIGCONT)
        if orch.poll() is None:
            orch.kill()
        orch.communicate()


def test_sigkill_mid_transfer_leaves_no_ssh_and_the_next_download_cleans_up(site: dict[str, Path]) -> None:
    with stalled_download(site) as (orch, part, _cats):
        big = site["remote"] / layout.RUNS_DIR / "big" / BEST
        assert ssh_clients(site["remote"])
        orch.kill()
        orch.wait()
        wait_for(lambda: not ssh_clients(site["remote"]), timeout=5)  # the kernel killed it with orch
        assert part.exists()  # what a SIGKILL leaves: only a temp file ...
    make_run(site["remote"], "big", normal_files(), best=0.9)  # a small best: quick to fetch in full
    proc = run_orch("download", "big", "-c", site["cfg"], "--dest", site["dest"])
    assert proc.returncode == 0, proc.stderr
    assert not list(site["dest"].rglob("*.part-*"))  # ... which the next download removes
    assert (site["dest"] / "big" / BEST).read_bytes() == big.read_bytes()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_an_interrupted_download_stops_at_once_and_leaves_nothing(site: dict[str, Path], sig: int) -> None:
    with stalled_download(site) as (orch, _part, _cats):
        orch.send_signal(sig)
        _out, err = signal_ended(orch, 60)
        assert orch.returncode == 130, err
        assert not ssh_clients(site["remote"])
        assert not list(site["dest"].rglob("*.part-*")) and not (site["dest"] / "big" / BEST).exists()


# --------------------------------------------------------------------------- full disk

def test_a_full_disk_is_one_line_and_leaves_nothing(site: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    from orchestrator import destination
    from orchestrator.download import download
    from orchestrator.errors import DiskFull

    make_run(site["remote"], "big", normal_files(2 << 20), best=0.9)
    dest = site["tmp"] / "small"
    with small_disk(dest, 512) as mounted:
        if mounted:  # too small for the checkpoint: refused before a byte is written
            proc = run_orch("download", "big", "-c", site["cfg"], "--dest", dest)
            assert proc.returncode == 14, proc.stderr
            assert proc.stderr.strip() == (f"orch: error: no space left on device on {dest}: free space and run "
                                           "the download again")
            assert tree(dest) == []
        # The space ran out while writing (another program took it, or a quota): found all the same.
        monkeypatch.setattr(destination, "free_bytes", lambda _p: 1 << 40)
        if not mounted:  # no tmpfs here: the file system's answer is simulated at the write call
            monkeypatch.setattr(destination, "short_for_lack_of_room", lambda _tmp, _size: True)
        with pytest.raises(DiskFull, match="no space left on device on"):
            download(Context(load_config(site["cfg"])), "big", dest=dest)
        assert not list(dest.rglob("*.part-*")) and not (dest / "big" / BEST).exists()


def test_a_machine_side_that_dies_mid_transfer_is_one_line_and_leaves_nothing(site: dict[str, Path]) -> None:
    with stalled_download(site) as (orch, _part, senders):
        for pid in senders:  # the connection's far end is gone in the middle of the checkpoint
            os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):  # a stopped sender killed may be gone already
                os.kill(pid, signal.SIGCONT)
        _out, err = orch.communicate(timeout=60)
    assert orch.returncode == 7, err
    assert err.count("\n") == 1 and "ended inside big/checkpoints/best.weights.h5" in err, err
    assert not list(site["dest"].rglob("*.part-*")) and not (site["dest"] / "big" / BEST).exists()
