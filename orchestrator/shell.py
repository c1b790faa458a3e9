"""`orch exec` and `orch ssh`: a command, or a shell, on the machine, in remote.root, with the
very connection settings and host-key policy of every other command. Neither starts a stopped
instance (exit 11).

- ``exec``: one argument is a shell command line, run as it is (``orch exec 'nvidia-smi | head'``);
  several are each one word, quoted (``orch exec -- ls -l 'my file'`` lists one file), as
  ``subprocess`` takes a string or a list. The machine's login shell runs it (on ``target:
  local``, /bin/sh), as ``ssh HOST CMD`` would. Its output is streamed as it comes, stdout to
  stdout and stderr to stderr; its stdin is this command's when that is not a terminal (a
  pipe, a file); its exit code is orch's (255: it was killed by a signal, as OpenSSH says it).
  A command that never reads its input nor writes may outlive a Ctrl-C, as with plain ssh.
- ``ssh``: OpenSSH's client with the resolved settings (hops, user, key, orch's known_hosts,
  StrictHostKeyChecking yes), after orch's own connection checked the host key (an unknown key
  of an EC2 instance is trusted only from its console, as always); a terminal when stdin is
  one. On ``target: local``: $SHELL in remote.root.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from orchestrator import children
from orchestrator.context import Context
from orchestrator.errors import ConfigError
from orchestrator.provision import acquire
from orchestrator.remote import Reader, Sink, Streams, q, shell_status
from orchestrator.ssh import SshRemote


def command_line(argv: Sequence[str]) -> str:
    """The shell command line of `orch exec ARGS`: one argument as it is, several each quoted."""
    if not argv or not "".join(argv).strip():
        raise ConfigError("orch exec needs a command: `orch exec -- nvidia-smi` (or one command line in quotes)")
    return argv[0] if len(argv) == 1 else " ".join(q(a) for a in argv)


def in_folder(folder: str, line: str) -> str:
    """``line`` run in ``folder`` (made if missing: a machine nothing was deployed to yet has
    none), never elsewhere: on its own line, so ``;``, ``||`` and ``&`` in it stay its own."""
    return f"mkdir -p -- {q(folder)} && cd -- {q(folder)} || exit 1\n{line}"


def execute(ctx: Context, argv: Sequence[str], stdin: Reader | None, out: Sink, err: Sink) -> int:
    """Run `orch exec`'s command on the machine in remote.root, its stdin from ``stdin`` (None:
    none); its exit code."""
    line = command_line(argv)
    with acquire(ctx) as m:
        return m.remote.interact(in_folder(m.root, line), stdin, Streams(out, err))


def shell(ctx: Context, *, terminal: bool) -> int:
    """An interactive shell on the machine in remote.root (``terminal``: stdin is one, so the
    shell gets a terminal too); its exit code."""
    with acquire(ctx) as m:
        root = m.root
        if isinstance(m.remote, SshRemote):
            login = f'mkdir -p -- {q(root)} && cd -- {q(root)} && exec "${{SHELL:-/bin/sh}}" -l'
            # sh -c: the same words whatever the login shell is (fish included)
            argv = [*m.remote.openssh_argv("-o", "BatchMode=no", "-o", "LogLevel=ERROR", "-t" if terminal else "-T"),
                    f"exec sh -c {q(login)}"]
            return shell_status(children.spawn(argv).wait())
        Path(root).mkdir(parents=True, exist_ok=True)
        return shell_status(children.spawn([os.environ.get("SHELL") or "/bin/sh"], cwd=root).wait())
