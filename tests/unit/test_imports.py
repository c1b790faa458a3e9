"""Heavy imports stay lazy, and the halves stay apart (DESIGN.md)."""

import subprocess
import sys


def modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", f"{code}\nimport sys\nprint(' '.join(sys.modules))"],
                         capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_orch_cli_starts_without_boto3_paramiko_or_tensorflow() -> None:
    loaded = modules_after("import orchestrator.cli")
    assert not loaded & {"boto3", "botocore", "paramiko", "tensorflow", "keras", "numpy"}


def test_trainer_data_layer_needs_no_tensorflow() -> None:
    loaded = modules_after("import trainer.cli, trainer.data, trainer.checkdata, trainer.synth, trainer.split")
    assert not loaded & {"tensorflow", "keras", "orchestrator"}


def test_the_contract_and_probe_are_pure_python() -> None:
    loaded = modules_after("import trainer.layout, trainer.probe, trainer.options, trainer.wire, "
                           "trainer.exitcodes, trainer.codeversion")
    assert not loaded & {"numpy", "tensorflow", "keras", "orchestrator"}
