"""The three kinds of trainer code and their import rules (trainer/__init__.py), enforced.

- Statically: every module's imports (function-level ones included) against its package's rule.
- For real: every module of the machine side imports, and every verb runs, under
  `python3 -I -S` from exactly the bundle orch sends (orchestrator.machine.bundle_payload over
  trainer.contract.codeversion.bundle_files), with no site packages at all: numpy, keras and
  tensorflow cannot be imported there. A bundle that lacks a module, or a machine-side module
  that imports numpy, fails the same check (both shown below with broken bundles).
"""

from __future__ import annotations

import ast
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from orchestrator.machine import bundle, bundle_payload
from trainer.contract import verbs
from trainer.contract.codeversion import PACKAGE, bootstrap_source, bundle_files

ROOT = PACKAGE.parent
STDLIB = set(sys.stdlib_module_names) | {"__future__"}
HEAVY = {"numpy", "keras", "tensorflow"}


def imports_of(path: Path) -> set[str]:
    """The top-level names a module imports, and the trainer/orchestrator modules it names."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            if node.module == "trainer":  # `from trainer import x`: x is a module of the package
                found |= {f"trainer.{alias.name}" for alias in node.names}
    return found


def allowed(name: str, packages: tuple[str, ...]) -> bool:
    return name.split(".")[0] in STDLIB or name == "trainer" or any(
        name == p or name.startswith(p + ".") for p in packages)


RULES = {  # package -> what its modules may import besides the standard library
    "trainer/contract": ("trainer.contract",),
    "trainer/machine": ("trainer.contract", "trainer.machine"),
}
# The one exception, and why: the preflight exists to import the *training* interpreter's
# TensorFlow and Keras (inside tensorflow_gpus(), only when they are installed); under -I -S it
# runs without them (test below).
EXEMPT = {"trainer/machine/preflight.py": {"tensorflow", "keras"}}


@pytest.mark.parametrize("package", sorted(RULES))
def test_each_kind_imports_only_what_its_rule_allows(package: str) -> None:
    modules = sorted((ROOT / package).glob("*.py"))
    assert modules
    wrong = {f"{m.relative_to(ROOT)}: {name}" for m in modules for name in imports_of(m)
             if not allowed(name, RULES[package]) and name not in EXEMPT.get(str(m.relative_to(ROOT)), ())}
    assert not wrong, wrong


def test_the_trainer_never_imports_orch_and_orch_never_the_machine_side_or_the_trainer() -> None:
    ml = {f"{m.name}: {n}" for m in (ROOT / "trainer" / "ml").glob("*.py") for n in imports_of(m)
          if n.startswith("orchestrator") or n.split(".")[0] == "optuna"}  # sweeps are the laptop's: no optuna there
    orch = {f"{m.name}: {n}" for m in (ROOT / "orchestrator").glob("*.py") for n in imports_of(m)
            if n.startswith(("trainer.machine", "trainer.ml")) or n.split(".")[0] in HEAVY}
    assert not ml and not orch, (ml, orch)


def test_every_package_states_its_import_rule() -> None:
    for package in ("contract", "machine", "ml"):
        doc = ast.get_docstring(ast.parse((ROOT / "trainer" / package / "__init__.py").read_text()))
        assert doc and "Import rule:" in doc, package
    assert "three kinds" in (ast.get_docstring(ast.parse((ROOT / "trainer" / "__init__.py").read_text())) or "")


def test_the_bundle_is_derived_from_the_packages() -> None:
    files = bundle_files()
    on_disk = {f"trainer/{p.relative_to(PACKAGE).as_posix()}" for pkg in ("contract", "machine")
               for p in (PACKAGE / pkg).glob("*.py")} | {"trainer/__init__.py"}
    assert set(files) == on_disk


# --------------------------------------------------------------------------- for real

def other_pythons() -> list[str]:
    """One interpreter of every other python3 version >= 3.8 on this machine (a bare CI machine
    has none): the machine's python3 may be older than the laptop's."""
    candidates = {shutil.which(f"python3.{minor}") for minor in range(8, 15)}
    pyenv = Path(os.environ.get("PYENV_ROOT") or Path("~/.pyenv").expanduser()) / "versions"
    candidates |= {str(p) for p in pyenv.glob("3.*/bin/python3")}
    versions: dict[str, str] = {}
    for path in sorted(p for p in candidates if p):
        try:
            out = subprocess.run([path, "-I", "-S", "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                                 capture_output=True, text=True, timeout=20)
        except OSError:
            continue
        version = out.stdout.strip()
        if out.returncode == 0 and version.count(".") == 1 and tuple(map(int, version.split("."))) >= (3, 8):
            versions.setdefault(version, path)
    mine = f"{sys.version_info[0]}.{sys.version_info[1]}"
    return [path for version, path in sorted(versions.items()) if version != mine]


PYTHONS = [sys.executable, *other_pythons()]


def bare_python(code: str, stdin: bytes = b"", *args: str, python: str = sys.executable
                ) -> subprocess.CompletedProcess[bytes]:
    """The machine's bare python3: no PYTHON* variables, no user or site packages, no working folder."""
    return subprocess.run([python, "-I", "-S", "-c", code, *args], input=stdin, capture_output=True, timeout=60)


def test_heavy_packages_cannot_be_imported_there() -> None:
    for name in HEAVY:
        assert bare_python(f"import {name}").returncode != 0, name


def import_every_module(payload: bytes, modules: list[str], python: str = sys.executable) -> list[str]:
    """Import each module from the bundle with the bootstrap's own finder; the modules that fail, with why."""
    script = (bootstrap_source() + "\nimport importlib, traceback\n"
              "sys.meta_path.insert(0, BundleFinder(zipfile.ZipFile(io.BytesIO(read_exactly(int(read_exactly(HEADER)))))))\n"
              f"for name in {modules!r}:\n"
              "    try:\n        importlib.import_module(name)\n"
              "    except BaseException as exc:\n        print(name, type(exc).__name__, exc)\n")
    script = script.replace('if __name__ == "__main__":\n    main()', "")  # the loader only, not its main()
    out = bare_python(script, payload, python=python)
    assert out.returncode == 0, out.stderr.decode()
    return [line for line in out.stdout.decode().splitlines() if line.strip()]


def machine_modules(files: dict[str, bytes]) -> list[str]:
    return sorted(name[:-3].replace("/", ".") for name in files
                  if name.startswith("trainer/machine/") and not name.endswith("__main__.py")
                  and not name.endswith("bootstrap.py"))


def smoke_cases(tmp: Path) -> dict[str, tuple[list[str], bytes]]:
    """One harmless call of every verb (arguments, what follows the bundle on stdin)."""
    root, run_dir, data = tmp / "root", tmp / "root" / "runs" / "r1", tmp / "root" / "data"
    run_dir.mkdir(parents=True)
    data.mkdir()
    (run_dir / "status.json").write_text('{"state": "finished"}')
    code = tmp / "code"
    code.mkdir()
    upload = io.BytesIO()
    with tarfile.open(fileobj=upload, mode="w") as t:
        info = tarfile.TarInfo("a.npz")
        info.size = 1
        t.addfile(info, io.BytesIO(b"x"))
    tar = io.BytesIO()
    with tarfile.open(fileobj=tar, mode="w:gz") as t:
        info = tarfile.TarInfo("trainer/x.py")
        info.size = 1
        t.addfile(info, io.BytesIO(b"\n"))
    r, d = str(root), str(run_dir)
    return {
        "home": ([], b""), "runs": ([r], b""), "host": ([], b""), "snapshot": ([d, "0", "5"], b""),
        "snapshots": ([d, "60"], b"0 5\n"),
        "machine": ([r], b""), "log": ([d, "0"], b""), "files": ([d], b""), "started": ([d, "1", "0"], b""),
        "launch": ([r, "nope", "--continue", "--python", sys.executable, "--code", str(code), "--data-dir", str(data)],
                   b""),
        "signal": ([d], b""), "env": ([str(tmp / "envs"), "--requirements", "numpy\n", "--check"], b""),
        "preflight": ([r, str(data)], b""), "setup": ([str(code), sys.executable, "true"], b""),
        "autostop": ([r, "status"], b""), "watch": ([r], b""), "hold": ([r, "0.2"], b""),
        "log-filter": (["2"], b"a line of the trainer's\n"),
        "code-state": ([r, "v1"], b""), "code-unpack": ([r, "v1"], tar.getvalue()), "data-list": ([str(data)], b""),
        "data-receive": ([str(tmp / "staging"), str(tmp / "moved")], verbs.DATA_GO + upload.getvalue()),
        "send": ([r, "5"], b"files r1\nget 100 r1/status.json\n"),
        "notify": (["test"], b"{}"), "remove": ([r, "not-there"], b""),
        "tensorboard": ([r, "/bin/false", "0", "1", "0", "5", "r1"], b""),  # no TensorBoard there: says so
    }


def run_every_verb(payload: bytes, tmp: Path, python: str = sys.executable) -> list[str]:
    """Each verb through the bootstrap, as orch runs it; the problems (no answer where the
    contract names one, an answer that is not its record, a traceback)."""
    cases = smoke_cases(tmp)
    (tmp / "moved").mkdir()
    assert set(cases) == set(verbs.VERBS), "every verb needs a smoke case here"
    problems = []
    for name, (args, stdin) in cases.items():
        verb = verbs.VERBS[name]
        out = bare_python(bootstrap_source(), payload + stdin, "FRAME", name, *args, python=python)
        err = out.stderr.decode(errors="replace")
        frames = [line.split(" ", 2) for line in out.stdout.decode(errors="replace").splitlines()
                  if line.startswith("FRAME ")]
        answers = [json.loads(rest[1]) for _, *rest in frames if rest[0] == verbs.ANSWER]
        if "Traceback" in err or (verb.answer is None and out.returncode != 0):
            problems.append(f"{name}: exit {out.returncode}: {err.strip().splitlines()[-1:]}")
        elif verb.stream and [verbs.STREAM] not in [rest for _, *rest in frames]:
            problems.append(f"{name}: no stream frame")
        elif verb.answer is not None:
            if len(answers) != 1:
                problems.append(f"{name}: {len(answers)} answers, exit {out.returncode}: {err.strip()[-300:]}")
            else:
                verb.answer.from_json(answers[0])  # the record the contract names, or WireError
    return problems


@pytest.mark.parametrize("python", PYTHONS)
def test_every_machine_module_imports_and_every_verb_runs_from_the_bundle(tmp_path: Path, python: str) -> None:
    modules = machine_modules(bundle_files())
    assert "trainer.machine.proc" in modules and len(modules) >= 12
    assert import_every_module(bundle(), modules, python) == []
    assert run_every_verb(bundle(), tmp_path, python) == []


def test_a_bundle_without_a_module_fails_the_check(tmp_path: Path) -> None:
    files = bundle_files()
    del files["trainer/machine/proc.py"]
    broken = bundle_payload(files)
    failed = import_every_module(broken, machine_modules(bundle_files()))
    assert any(line.startswith("trainer.machine.proc ") for line in failed)
    assert any(line.startswith("trainer.machine.probe ") and "proc" in line for line in failed)
    problems = run_every_verb(broken, tmp_path)
    assert any(p.startswith("runs:") for p in problems) and any("proc" in p for p in problems), problems


def test_a_machine_module_that_imports_numpy_fails_the_check(tmp_path: Path) -> None:
    package = tmp_path / "trainer"
    shutil.copytree(PACKAGE, package, ignore=shutil.ignore_patterns("__pycache__"))
    hold = package / "machine" / "hold.py"
    hold.write_text(hold.read_text().replace("import os\n", "import os\n\nimport numpy  # noqa: F401\n", 1))
    broken = bundle_payload(bundle_files(package))
    failed = import_every_module(broken, machine_modules(bundle_files(package)))
    assert [line.split()[:2] for line in failed] == [["trainer.machine.hold", "ModuleNotFoundError"]], failed
    work = tmp_path / "work"
    work.mkdir()
    problems = run_every_verb(broken, work)
    assert [p.split(":")[0] for p in problems] == ["hold"], problems


# --------------------------------------------------------------------------- lazy imports

def modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", f"{code}\nimport sys\nprint(' '.join(sys.modules))"],
                         capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_orch_cli_starts_without_boto3_paramiko_optuna_or_tensorflow() -> None:
    loaded = modules_after("import orchestrator.cli, orchestrator.sweepspec")
    assert not loaded & {"boto3", "botocore", "paramiko", "optuna", "sqlalchemy", "tensorflow", "keras", "numpy"}


def test_trainer_data_layer_needs_no_tensorflow() -> None:
    loaded = modules_after("import trainer.ml.cli, trainer.ml.data, trainer.ml.checkdata, trainer.ml.synth, "
                           "trainer.ml.split")
    assert not loaded & {"tensorflow", "keras", "orchestrator"}


def test_the_trainers_entry_keeps_scikit_learn_out_of_its_keras() -> None:
    """scikit-learn is installed here (the benches use it): the trainer's process must not pay its
    import, which Keras makes for wrappers the trainer never uses."""
    loaded = modules_after("import runpy, sys\nsys.argv = ['trainer', '--help']\ntry:\n"
                           "    runpy.run_module('trainer', run_name='__main__')\nexcept SystemExit:\n    pass\n"
                           "import keras")
    assert "keras.src" in loaded and not {m for m in loaded if m.startswith("sklearn.")}
