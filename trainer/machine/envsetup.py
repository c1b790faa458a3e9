"""The managed environment on the machine (verb ``env``, run with the machine's python3):

    env ENVS_DIR --requirements TEXT [--packages-from PY] [--index-url URL] [--pip-arg ARG]... [--check]
                                                                                -> EnvAnswer

One virtualenv per (requirements, Python version, GPU or not, pip options): ``ENVS_DIR/<hash>/``.
Built once under an flock (two deploys installing at once wait for each other), marked ready
by an atomically written ``layout.ENV_READY`` file only after pip succeeded: a failed or
interrupted install is never taken for a ready env, and the next deploy starts it again.
Where ``nvidia-smi`` lists GPUs, TensorFlow is installed with its CUDA libraries
(``tensorflow[and-cuda]``); plain ``tensorflow`` on a GPU box trains on the CPU.

Reports progress (pip's Collecting/Installing lines) while it works. The pip log stays in
``<env>/install.log``. Standard library only.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable  # typing's: subscripted at run time on python3 3.8

from trainer.contract import layout
from trainer.contract.files import is_disk_full
from trainer.contract.wire import EnvAnswer
from trainer.machine.locks import lock
from trainer.machine.proc import bounded_output
from trainer.machine.readers import tail_lines

READY, LOG = layout.ENV_READY, layout.ENV_LOG
_NO_SPACE = "No space left on device"  # what pip and venv print for ENOSPC
Progress = Callable[[str], None]
# pip output worth showing as progress (the rest stays in install.log)
PROGRESS = re.compile(r"^(Collecting|Downloading|Installing collected|Successfully installed|ERROR)")
_TENSORFLOW = re.compile(r"^tensorflow(\[[^\]]*\])?(?=\s*([<>=!~;]|$))", re.IGNORECASE)


def gpu_count() -> int:
    """GPUs nvidia-smi lists; -1 when nvidia-smi is there but fails (a GPU box whose driver is
    broken: it still gets GPU TensorFlow); 0 without nvidia-smi."""
    if shutil.which("nvidia-smi") is None:
        return 0
    try:
        code, listed = bounded_output(["nvidia-smi", "-L"], timeout=30)
    except OSError:
        return -1
    found = sum(line.startswith("GPU ") for line in listed.splitlines()) if code == 0 else 0
    return found or -1


def for_gpus(requirements: str) -> str:
    """``tensorflow`` -> ``tensorflow[and-cuda]``: the CUDA libraries come with it."""
    def cuda(line: str) -> str:
        match = _TENSORFLOW.match(line.strip())
        if not match:
            return line
        extras = {e.strip() for e in (match.group(1) or "[]")[1:-1].split(",") if e.strip()} | {"and-cuda"}
        return f"tensorflow[{','.join(sorted(extras))}]" + line.strip()[match.end():]

    return "\n".join(cuda(line) for line in requirements.splitlines()) + "\n"


def env_key(requirements: str, args: argparse.Namespace) -> str:
    what = {"requirements": requirements, "python": list(sys.version_info[:3]), "packages_from": args.packages_from,
            "index_url": args.index_url, "pip_args": args.pip_arg}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:12]


def _lock(envs: Path, key: str, progress: Progress) -> int:
    fd = lock(envs / f"{key}{layout.ENV_LOCK_SUFFIX}",
              waiting=lambda: progress("another deploy is installing this environment; waiting for it"))
    assert fd is not None  # no time limit: an install takes as long as it takes
    return fd


def _site_packages(python: str) -> tuple[str, list[str]]:
    """(X.Y, the site-packages folders) of another interpreter."""
    code = "import site, sys; print('%d.%d' % sys.version_info[:2]); print('\\n'.join(site.getsitepackages()))"
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise RuntimeError(f"packages_from {python}: cannot run it ({(out.stderr or out.stdout).strip()[-200:]})")
    version, *folders = out.stdout.split("\n")
    return version.strip(), [f for f in folders if f.strip()]


def _create(env: Path, packages_from: str | None) -> None:
    shutil.rmtree(env, ignore_errors=True)  # a half-built one from an interrupted install
    made = subprocess.run([sys.executable, "-m", "venv", str(env)], capture_output=True, text=True)
    if made.returncode != 0:
        why = (made.stderr or made.stdout).strip().splitlines()
        raise RuntimeError(f"{sys.executable} -m venv failed ({why[-1] if why else made.returncode}); on "
                           "Debian/Ubuntu: sudo apt-get install python3-venv")
    if packages_from:
        packages_from = os.path.expanduser(packages_from)
        version, folders = _site_packages(packages_from)
        mine = "{}.{}".format(*sys.version_info[:2])
        if version != mine:
            raise RuntimeError(f"packages_from {packages_from} is Python {version}, the env's is {mine}")
        site = next(env.glob("lib/python*/site-packages"))
        (site / "orch-packages-from.pth").write_text("\n".join(folders) + "\n")


def _install(env: Path, requirements: Path, args: argparse.Namespace, progress: Progress) -> None:
    cmd = [str(env / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check",
           *(["--index-url", args.index_url] if args.index_url else []), *args.pip_arg, "-r", str(requirements)]
    with open(env / LOG, "w") as log:
        log.write("$ " + re.sub(r"://[^/\s]*@", "://****@", " ".join(cmd)) + "\n")  # never a credential
        log.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            if PROGRESS.match(line):
                progress(line.strip()[:160])
        if proc.wait() != 0:
            raise RuntimeError(f"pip install failed (exit {proc.returncode})")


class EnvFailed(Exception):
    def __init__(self, message: str, log: Path) -> None:
        super().__init__(message)
        self.log = log

    def log_tail(self, lines: int = 8) -> list[str]:
        return [line.rstrip() for line in tail_lines(self.log, lines)]


def locate(requirements: str, args: argparse.Namespace) -> tuple[str, str, int]:
    """(requirements as installed here, the env's key, GPUs listed)."""
    gpus = gpu_count()
    if gpus:
        requirements = for_gpus(requirements)
    return requirements, env_key(requirements, args), gpus


def ensure(envs: Path, args: argparse.Namespace, progress: Progress) -> EnvAnswer:
    requirements, key, gpus = locate(args.requirements, args)
    env = envs / key
    python = str(env / "bin" / "python")
    if args.check:  # only say whether it is there (orch doctor)
        return EnvAnswer(python if (env / READY).is_file() else None, key, False, gpus)
    envs.mkdir(parents=True, exist_ok=True)
    fd = _lock(envs, key, progress)
    try:
        if (env / READY).is_file():
            return EnvAnswer(python, key, False, gpus)
        progress(f"building the environment {env} ({'GPU' if gpus else 'CPU'} TensorFlow); once per "
                 "requirements and Python version")
        start = time.monotonic()
        try:
            _create(env, args.packages_from)
            (env / "requirements.txt").write_text(requirements)
            _install(env, env / "requirements.txt", args, progress)
        except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
            raise EnvFailed(str(exc), env / LOG) from exc
        tmp = env / f"{READY}.tmp"
        tmp.write_text(json.dumps({"requirements": requirements, "python": list(sys.version_info[:3]),
                                   "seconds": round(time.monotonic() - start, 1)}))
        os.replace(tmp, env / READY)  # the commit point: only now is the env ready
        return EnvAnswer(python, key, True, gpus)
    finally:
        os.close(fd)


def run(verb: str, argv: list[str], out: Any) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m trainer.machine FRAME env")
    parser.add_argument("envs", type=Path)
    parser.add_argument("--requirements", required=True, help="the requirements.txt text")
    parser.add_argument("--packages-from")
    parser.add_argument("--index-url")
    parser.add_argument("--pip-arg", action="append", default=[])
    parser.add_argument("--check", action="store_true", help="build nothing: is the env there?")
    args = parser.parse_args(argv)
    try:
        out.answer(ensure(args.envs, args, out.progress))
    except EnvFailed as exc:
        tail = exc.log_tail()
        out.answer(EnvAnswer(error=str(exc), log=str(exc.log), log_tail=tail, disk_full=_full(exc, tail)))
        return 1
    except OSError as exc:
        out.answer(EnvAnswer(error=str(exc), disk_full=_full(exc, [])))
        return 1
    return 0


def _full(exc: BaseException, tail: list[str]) -> bool:
    """Whether the install failed for want of disk (an OSError of ours, or what pip or venv said)."""
    return is_disk_full(exc) or any(_NO_SPACE in text for text in (str(exc), *tail))
