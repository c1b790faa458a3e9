"""`orch tensorboard [RUN ...]`: TensorBoard on the machine for the runs' event files
(trainer/ml/tbevents.py: one event per committed epoch, steps counting epochs from 1, an
extended run's going on from its parent's best epoch), shown here at http://127.0.0.1:PORT/.

The machine runs ONE TensorBoard per remote.root (verb ``tensorboard``,
trainer/machine/tboard.py), bound to its own 127.0.0.1, started by the training interpreter
(which has TensorBoard: trainer/requirements.txt) and remembered in remote.root, so a second
`orch tensorboard` for the same runs reuses it. It is stopped when the command ends (Ctrl-C),
unless ``--keep`` or another `orch tensorboard` still uses it; if orch dies or the laptop
vanishes, the machine side notices (EOF, or no ping for 90 s) and stops it all the same.
Here, 127.0.0.1:PORT (default 6006, or a free port when that one is taken; an explicit
``--port`` must be free) is carried to it through the control connection (``direct-tcpip``
channels: orchestrator/forward.py), never through another process. On ``target: local`` it
binds 127.0.0.1:PORT itself: no forwarding. Never starts a stopped instance (exit 11).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from orchestrator.context import Context
from orchestrator.environment import existing_python
from orchestrator.errors import BusyError, ConfigError, NoSuchRun, NotReady, RemoteError
from orchestrator.forward import Forwarder
from orchestrator.machine import SILENCE, LiveVerb, Machine, find_run
from orchestrator.provision import acquire
from orchestrator.ssh import SshRemote
from trainer.contract import layout, verbs
from trainer.contract.wire import TensorBoardAnswer

DEFAULT_PORT = 6006  # TensorBoard's own
FATES = ("stopped", "kept", "in use")  # what the machine side says became of TensorBoard at the end


@dataclass(frozen=True)
class Board:
    """TensorBoard, serving: where to open it and what it shows."""

    url: str
    runs: tuple[str, ...]
    host: str
    pid: int | None
    reused: bool
    forwarded: bool  # through the control connection (False: this computer is the machine)

    def line(self) -> str:
        how = "reused" if self.reused else "started"
        via = f"on {self.host}, forwarded through the SSH connection" if self.forwarded else "on this computer"
        return (f"TensorBoard at {self.url} ({len(self.runs)} run{'s' if len(self.runs) != 1 else ''}: "
                f"{', '.join(self.runs[:6])}{', ...' if len(self.runs) > 6 else ''}; {how} {via}, pid {self.pid}); "
                "Ctrl-C ends it")


@dataclass(frozen=True)
class Ended:
    """What became of TensorBoard when the command ended."""

    board: Board
    fate: str  # stopped, kept, in use

    def summary(self) -> str:
        if self.fate == "kept":
            return (f"TensorBoard left running on {self.board.host} (pid {self.board.pid}, --keep): the next `orch "
                    "tensorboard` for the same runs reuses it, and stops it when it ends without --keep")
        if self.fate == "in use":
            return "TensorBoard left running: another `orch tensorboard` still uses it"
        return "TensorBoard stopped"


def serve(ctx: Context, run_ids: Sequence[str], *, port: int | None = None, keep: bool = False,
          show: Callable[[Board], None] = lambda _b: None, until: threading.Event | None = None) -> Ended:
    """Serve TensorBoard for ``run_ids`` (ids or unique prefixes; none: every run) until
    ``until`` is set or Ctrl-C; then stop it (unless ``keep`` or another command uses it)."""
    stop = until or threading.Event()
    with acquire(ctx) as m:
        runs = chosen_runs(m, run_ids)
        python = existing_python(m)
        if python is None:
            raise NotReady(f"no training environment on {m.remote.host} yet, so no TensorBoard: the first "
                           "`orch deploy` builds it")
        ssh = isinstance(m.remote, SshRemote)
        remote_port: list[int] = []  # known once the machine answers
        forwarder = Forwarder(lambda: _tunnel(m, remote_port), port or DEFAULT_PORT, any_port=port is None) \
            if ssh else None  # bound first: a taken --port fails before anything starts there
        session = LiveVerb(m, verbs.TENSORBOARD, m.root, python, 0 if ssh else port or DEFAULT_PORT,
                          int(not ssh and port is None), int(keep), SILENCE, *runs, on_end=stop.set)
        try:
            answer = _served(session.answer(), m, python, port)
            remote_port.append(answer.port)
            shown = forwarder.port if forwarder is not None else answer.port
            board = Board(f"http://127.0.0.1:{shown}/", tuple(runs), m.remote.host, answer.pid, answer.reused,
                          forwarder is not None)
            with contextlib.suppress(KeyboardInterrupt):  # once it is shown, Ctrl-C is how it is meant to end
                show(board)
                stop.wait()
        finally:
            if forwarder is not None:
                forwarder.close()
            fates = session.close()
    if session.failure is not None:
        raise session.failure
    fate = fates[-1] if fates else ""
    if fate.startswith("exited"):
        raise RemoteError(f"TensorBoard exited on {board.host}: {fate.partition(': ')[2] or 'no last words'}")
    if fate not in FATES:
        raise RemoteError(f"orch's TensorBoard helper on {board.host} ended without saying what became of TensorBoard "
                          f"(pid {board.pid}); the next `orch tensorboard` reuses it, or stops it when it ends")
    return Ended(board, fate)


def chosen_runs(m: Machine, run_ids: Sequence[str]) -> list[str]:
    """The runs asked for (each an id or a unique prefix), or every run; each once."""
    runs = m.runs()
    if not run_ids:
        found = [r.run_id for r in runs if layout.is_run_id(r.run_id)]  # the machine names them: checked
        if not found:
            raise NoSuchRun(f"no run on {m.remote.host} yet; start one with `orch deploy`")
        return found
    chosen: list[str] = []
    for run_id in run_ids:
        found = find_run(runs, run_id, m.remote.host).run_id
        if not layout.is_run_id(found):
            raise RemoteError(f"the machine lists a run {found!r} that is not a valid run id")
        if found not in chosen:
            chosen.append(found)
    return chosen


def _tunnel(m: Machine, remote_port: list[int]) -> Any:
    if not remote_port:
        raise RemoteError("TensorBoard is not ready yet")
    assert isinstance(m.remote, SshRemote)
    return m.remote.tunnel("127.0.0.1", remote_port[0])


def _served(answer: TensorBoardAnswer, m: Machine, python: str, port: int | None) -> TensorBoardAnswer:
    """The answer of a TensorBoard that serves; each refusal as its own error."""
    host, why = m.remote.host, answer.message or "no reason given"
    if answer.error is None and answer.port is not None:
        return answer
    if answer.error == "missing":
        raise NotReady(f"TensorBoard is not installed for {python} on {host}: trainer/requirements.txt lists it, so "
                       "the environment a deploy builds has it; with remote.python, install it there "
                       f"(`orch exec -- {python} -m pip install tensorboard`)")
    if answer.error == "busy":
        raise BusyError(f"{why} (on {host})")
    if answer.error == "port":
        raise ConfigError(f"127.0.0.1:{port} is taken on this computer; choose another with --port")
    raise RemoteError(f"TensorBoard could not start on {host}: {why}")
