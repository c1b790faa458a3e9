"""remote.setup, once per code version (verb ``setup``):

    setup CODE_DIR PYTHON COMMAND                                               -> SetupResult

runs the user's shell COMMAND in CODE_DIR (beside requirements.txt; output to its setup.log),
with the training interpreter PYTHON's folder first on PATH (so `pip install ...` installs into
that env) and in $ORCH_PYTHON, under an flock there: of two
deploys at once the first runs it, the second waits and finds it done. Marked done only when it
exits 0, so a failed setup runs again next time. Standard library only.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

from trainer.contract import layout
from trainer.contract.wire import SetupResult
from trainer.machine.locks import lock
from trainer.machine.readers import tail_lines

LOG_LINES = 5


def once(code: Path, python: str, command: str) -> SetupResult:
    fd = lock(code / layout.SETUP_LOCK)
    try:
        if (code / layout.SETUP_DONE).exists():
            return SetupResult(ran=False)
        with open(code / layout.SETUP_LOG, "wb") as log:
            # remote.setup is the user's own shell command: it is run as written, on purpose.
            rc = subprocess.run(["/bin/sh", "-c", command], cwd=code, env=_env(python), stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT).returncode
        if rc == 0:
            (code / layout.SETUP_DONE).touch()
        tail = [] if rc == 0 else tail_lines(code / layout.SETUP_LOG, LOG_LINES)
        return SetupResult(ran=True, code=rc, log_tail=tail)
    finally:
        if fd is not None:
            os.close(fd)


def _env(python: str) -> dict[str, str]:
    env = dict(os.environ, ORCH_PYTHON=python)
    if "/" in python:
        env["PATH"] = os.path.dirname(python) + os.pathsep + env.get("PATH", os.defpath)
    return env


def run(verb: str, argv: list[str], out: Any) -> int:
    if len(argv) != 3:
        raise SystemExit("usage: python3 -m trainer.machine FRAME setup CODE_DIR PYTHON COMMAND")
    result = once(Path(argv[0]), argv[1], argv[2])
    out.answer(result)
    return 0 if result.code == 0 else 1
