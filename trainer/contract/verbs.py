"""What orch can ask of the machine: every verb of ``python3 -m trainer.machine FRAME VERB``,
declared once. orch names verbs from here; the machine's entry (trainer/machine/entry.py)
dispatches on this table and imports only the module that answers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

from trainer.contract import wire

R = TypeVar("R", bound=wire.Record)


@dataclass(frozen=True)
class Verb(Generic[R]):
    name: str
    module: str  # trainer.machine.<module> answers it
    answer: type[R] | None  # the record it answers with (None: it answers nothing)
    summary: str
    # Runs with the interpreter's own packages (the training Python's TensorFlow), as the
    # trainer will; every other verb runs under `python3 -I -S` (the standard library and the bundle only).
    site: bool = False
    stream: bool = False  # answers with a framed stream of raw bytes (STREAM below), not a record
    # answers once per question line on its stdin (one record each), until stdin ends: one
    # interpreter, and one trip of the bundle, for as many questions as orch has
    converses: bool = False


HOME = Verb("home", "probe", wire.Home, "the login's home folder")
RUNS = Verb("runs", "probe", wire.RunList, "ROOT: every run, with liveness")
HOST = Verb("host", "probe", wire.Host, "the GPUs (nvidia-smi) and the CPU/memory load")
SNAPSHOT = Verb("snapshot", "probe", wire.Snapshot, "RUN_DIR METRICS_OFFSET LOG_LINES: one monitor refresh")
SNAPSHOTS = Verb("snapshots", "probe", wire.Snapshot, "RUN_DIR IDLE: a snapshot per question 'METRICS_OFFSET "
                 "LOG_LINES' on stdin, until stdin ends or IDLE seconds pass without one", converses=True)
MACHINE = Verb("machine", "probe", wire.MachineReport, "ROOT: the host, every run and the autostop")
LOG = Verb("log", "logstream", None, "RUN_DIR OFFSET [--follow]: train.log from OFFSET on, streamed", stream=True)
FILES = Verb("files", "probe", wire.RunFiles, "RUN_DIR: the manifest and the run's regular files")
STARTED = Verb("started", "probe", wire.StartCheck, "RUN_DIR PID LAUNCHED_AT: has the launched trainer written its "
               "first status?")
LAUNCH = Verb("launch", "launch", wire.LaunchAnswer, "ROOT RUN_ID ...: busy check and detached start, atomically")
SIGNAL = Verb("signal", "launch", wire.Signalled, "RUN_DIR: SIGTERM the run's trainer (its pid and start time checked)")
ENV = Verb("env", "envsetup", wire.EnvAnswer, "ENVS_DIR ...: the managed virtualenv, built once")
PREFLIGHT = Verb("preflight", "preflight", wire.Preflight, "ROOT DATA_DIR: can this interpreter train here?", site=True)
SETUP = Verb("setup", "setup", wire.SetupResult, "CODE_DIR PYTHON COMMAND: remote.setup, once per code version")
AUTOSTOP = Verb("autostop", "watcher", wire.Autostop, "ROOT arm|disarm|status|wake: autostop")
WATCH = Verb("watch", "watcher", None, "ROOT: the watcher's loop (started detached by autostop arm)")
LOG_FILTER = Verb("log-filter", "logfilter", None, "RAW_LOG_FD: the trainer's output (stdin) into train.log, "
                  "timestamped, known noise left out; all of it to train.raw.log (started by launch)")
HOLD = Verb("hold", "hold", None, "ROOT SILENCE: hold the activity lock while orch works here")
CODE_STATE = Verb("code-state", "receive", wire.CodeState, "ROOT VERSION: is this code version here?")
CODE_UNPACK = Verb("code-unpack", "receive", wire.CodeState, "ROOT VERSION < tar.gz: unpack a code version atomically")
DATA_LIST = Verb("data-list", "receive", wire.DataListing, "DEST: the data files there (size, mtime)")
SEND = Verb("send", "sendfiles", None, "ROOT SILENCE < requests: a download's run files and their list, a block "
            "each, holding the machine busy", stream=True)
DATA_RECEIVE = Verb("data-receive", "receive", wire.Moved, "STAGING DEST [list] < go byte + tar: unpack an upload "
                   "beside, then move it into place ('list': answer data-list first)")
NOTIFY = Verb("notify", "notify", wire.Delivery, "test < SETTINGS: send a test message through the runs' webhook code")
REMOVE = Verb("remove", "remove", wire.Removed, "ROOT RUN_ID...: delete run folders, never an active run's")

TENSORBOARD = Verb("tensorboard", "tboard", wire.TensorBoardAnswer, "ROOT PYTHON PORT ANY KEEP SILENCE RUN...: "
                   "TensorBoard for the runs, started or reused, while orch pings")

VERBS: dict[str, Verb] = {v.name: v for v in (
    HOME, RUNS, HOST, SNAPSHOT, SNAPSHOTS, MACHINE, LOG, FILES, STARTED, LAUNCH, SIGNAL, ENV, PREFLIGHT, SETUP,
    AUTOSTOP, WATCH, LOG_FILTER, HOLD, CODE_STATE, CODE_UNPACK, DATA_LIST, DATA_RECEIVE, SEND, NOTIFY, REMOVE,
    TENSORBOARD)}

NO_FRAME = "-"  # FRAME for a process whose output nobody parses (the detached watcher)
ANSWER, PROGRESS = "answer", "progress"  # the kinds of framed line: `<FRAME> <kind> <json>`
STREAM = "stream"  # `\n<FRAME> stream\n`, then raw bytes to the end: a framed stream (a log, a file)

DATA_GO = b"T"  # what `data-receive` reads before the tar stream; EOF instead: nothing to unpack
LISTING_FIRST = "list"  # `data-receive`'s last argument: it answers data-list's DataListing first
