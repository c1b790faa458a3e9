"""Preflight: before any run folder is created, ONE remote command (trainer/machine/preflight.py,
run by the interpreter that will train) says whether the machine can train; a refusal is one line
with the fix and its exit code (12 not ready, 13 no data). ``orch doctor`` shows the same facts."""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.errors import NoData, NotReady, RemoteError
from orchestrator.machine import Machine
from trainer.contract import verbs
from trainer.contract.exitcodes import ExitCode
from trainer.contract.wire import DataCheck, Preflight

GB = 1e9


@dataclass(frozen=True)
class Finding:
    """One preflight or doctor check: its name, whether it passed, and what to do if not."""

    check: str
    ok: bool
    detail: str
    fix: str = ""
    exit_code: ExitCode = ExitCode.NOT_READY
    warning: bool = False  # passed, but worth the user's attention (the fix says what to do)


def ask(m: Machine, python: str, *, import_tensorflow: bool = False) -> Preflight:
    """The machine's answer for the training interpreter ``python``."""
    try:
        return m.answer(verbs.PREFLIGHT, m.root, m.data_dir,
                        *(["--import-tensorflow"] if import_tensorflow else []), python=python)
    except RemoteError as exc:
        raise NotReady(f"{python} cannot run on {m.remote.host} ({exc}); set remote.python to an interpreter "
                       "that exists there, or leave it unset for a managed env") from None


def findings(m: Machine, python: str, answer: Preflight, *, allow_cpu: bool = False) -> list[Finding]:
    """Every check, in the order a first day meets them."""
    host, cfg = m.remote.host, m.cfg
    found = answer.packages
    missing = [name for name in ("tensorflow", "keras", "numpy") if found.get(name) is None]
    fix_env = ("leave remote.python unset so orch builds its env, or install the trainer's requirements there "
               "(pip install -r requirements.txt)")
    gpus, tf = answer.nvidia, answer.tensorflow
    broken = tf.error if tf is not None else None
    problem = f"; missing: {', '.join(missing)}" if missing else f"; import fails: {broken}" if broken else ""
    detail = ", ".join(f"{k} {v}" for k, v in found.items() if v) + problem
    fix = (f"{', '.join(missing)} not installed for {python} on {host}: {fix_env}" if missing else
           f"TensorFlow/Keras are installed for {python} on {host} but do not import ({broken}): reinstall them, "
           "or leave remote.python unset for orch's env")
    out = [Finding("python", True, f"{answer.python.executable} (Python {answer.python.version})"),
           Finding("packages", not missing and not broken, detail, fix)]
    listed = gpus.count
    driver_broken = not listed and gpus.error not in (None, "no nvidia-smi")
    out.append(Finding(
        "gpus", not driver_broken or allow_cpu,
        f"nvidia-smi lists {listed}: {', '.join(gpus.names)} (driver {gpus.driver}, CUDA {gpus.cuda})"
        if listed else f"none ({gpus.error or 'nvidia-smi lists none'})",
        f"nvidia-smi is installed but fails ({gpus.error}): the NVIDIA driver is not working and training would "
        "run on the CPU; fix the driver (a reboot after a kernel update often does) or pass --allow-cpu"))
    if listed and not missing and not broken:
        sees = (tf.gpus if tf is not None else 0) or 0
        out.append(Finding(
            "tensorflow_gpus", sees > 0 or allow_cpu,
            f"TensorFlow sees {sees} of {listed}" + ("; --allow-cpu: training on the CPU" if sees == 0 and allow_cpu
                                                     else ""),
            f"TensorFlow sees no GPU although nvidia-smi lists {listed}: training would run on the CPU; install "
            "GPU TensorFlow (pip install 'tensorflow[and-cuda]', or leave remote.python unset for orch's env, "
            "which does) or pass --allow-cpu"))
    out.append(_data_finding(answer.data, host, cfg.data.local_dir))
    free, need = answer.disk.free_bytes / GB, cfg.remote.min_free_gb
    out.append(Finding("disk", free >= need, f"{free:.1f} GB free on {answer.disk.path}",
                       f"only {free:.1f} GB free on the runs' file system ({answer.disk.path}) on {host}; "
                       f"a run needs {need:g} GB (remote.min_free_gb): free some space"))
    out.append(Finding("root", answer.disk.writable, f"{answer.disk.path} is writable" if answer.disk.writable else
                       f"{answer.disk.path} is not writable",
                       f"this login cannot create files in {answer.disk.path} on {host} (remote.root {m.root}): "
                       "choose a remote.root in a folder it owns"))
    return out


def _data_finding(data: DataCheck, host: str, local_dir: str | None) -> Finding:
    sync = (f"`orch deploy --sync-data` uploads data.local_dir ({local_dir})" if local_dir
            else "set data.remote_dir to the feature folder (or data.local_dir and use --sync-data)")
    if not data.exists:
        return Finding("data", False, f"{data.dir}: missing", f"the data folder {data.dir} does not exist on "
                       f"{host}: {sync}", ExitCode.NO_DATA)
    # Counted by their names only (opening thousands of files is the trainer's job): say so, so
    # that check-data's usable count, lower when some files are damaged, is no surprise.
    return Finding("data", data.labelled > 0, f"{data.dir}: {data.labelled} feature files labelled by their names "
                   "(not opened: `python -m trainer check-data` there opens each and counts the usable ones)",
                   f"no labelled .npz/.npy feature files in {data.dir} on {host} ({data.feature_files} "
                   f"feature files in all): {sync}; `python -m trainer check-data` there says why", ExitCode.NO_DATA)


def require_ready(m: Machine, python: str, *, allow_cpu: bool = False) -> list[Finding]:
    """Refuse (one line, its exit code) unless every check passes."""
    results = findings(m, python, ask(m, python), allow_cpu=allow_cpu)
    for finding in results:
        if not finding.ok:
            error = NoData if finding.exit_code == ExitCode.NO_DATA else NotReady
            raise error(f"preflight: {finding.fix}")
    return results
