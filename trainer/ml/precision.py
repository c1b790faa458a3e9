"""Mixed precision: which Keras dtype policy a run trains in, chosen per device class, and why
(run.json records the choice).

The rule, and what it rests on:

- CPU: float32. Measured with ``bench/bench_gpu.py --quick`` on the 2-core CPU (TensorFlow),
  a training step in ``mixed_float16`` or ``mixed_bfloat16`` is slower than in float32 (CPUs
  without AMX emulate half-precision matrix products); see docs/BENCHMARKS.md.
- GPUs with tensor cores: ``mixed_bfloat16`` from compute capability 8.0 (Ampere, Hopper: the
  float32 range, so no loss scaling), ``mixed_float16`` on 7.x (Volta, Turing: tensor cores for
  float16 only; Keras adds loss scaling); float32 below 7.0 (no tensor cores). This follows the
  hardware's documented capabilities; ``bench/bench_gpu.py`` measures the three policies'
  samples/s on whatever GPU it runs on, which is how a figure for a device class is to be
  confirmed (none has been measured on a GPU yet).

``--mixed-precision`` forces half precision (the device class's kind, float16 where it has
none), ``--no-mixed-precision`` float32; unset means the rule above.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from trainer.machine.proc import bounded_output

FLOAT32, FLOAT16, BFLOAT16 = "float32", "mixed_float16", "mixed_bfloat16"
POLICIES = (FLOAT32, FLOAT16, BFLOAT16)


@dataclass(frozen=True)
class Device:
    """What the backend trains on: ``kind`` "gpu" or "cpu", and the first GPU's name and
    compute capability (major, minor) as nvidia-smi reports them (None when unknown)."""

    kind: str
    name: str | None = None
    capability: tuple[int, int] | None = None

    def describe(self) -> str:
        if self.kind != "gpu":
            return "CPU"
        cc = f", compute capability {self.capability[0]}.{self.capability[1]}" if self.capability else ""
        return f"GPU ({self.name or 'unknown'}{cc})"


@dataclass(frozen=True)
class Precision:
    policy: str  # a Keras dtype policy name
    device: Device
    requested: bool | None  # the option: True, False, None (chosen here)
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {"policy": self.policy, "requested": {True: "on", False: "off", None: "auto"}[self.requested],
                "device": self.device.describe(), "reason": self.reason}


def half_precision(device: Device) -> str | None:
    """The half-precision policy a device class computes fastest in, or None (float32 is)."""
    if device.kind != "gpu" or device.capability is None:
        return None
    if device.capability >= (8, 0):
        return BFLOAT16
    return FLOAT16 if device.capability >= (7, 0) else None


def choose(requested: bool | None, device: Device) -> Precision:
    """The policy for the option's value on ``device`` (see the module's rule)."""
    half = half_precision(device)
    if requested is False:
        return Precision(FLOAT32, device, requested, "--no-mixed-precision")
    if requested:
        return Precision(half or FLOAT16, device, requested, "--mixed-precision")
    if half is None:
        why = "no tensor cores known on this device" if device.kind == "gpu" else "float32 is fastest on CPUs"
        return Precision(FLOAT32, device, requested, why)
    return Precision(half, device, requested, f"tensor cores of compute capability "
                                               f"{device.capability[0]}.{device.capability[1]}")


def training_device() -> Device:
    """The device the Keras backend trains on (no backend imported beyond Keras's own)."""
    if not _backend_sees_a_gpu():
        return Device("cpu")
    name, capability = _nvidia_first_gpu()
    return Device("gpu", name, capability)


def _backend_sees_a_gpu() -> bool:
    import keras

    if keras.backend.backend() == "torch":
        import torch  # the backend itself: installed wherever Keras runs on it

        return bool(torch.cuda.is_available())
    try:
        devices = keras.distribution.list_devices()
    except (RuntimeError, NotImplementedError, ValueError):
        return False
    return any(d.split(":")[0].lower() in ("gpu", "cuda") for d in devices)


def _nvidia_first_gpu() -> tuple[str | None, tuple[int, int] | None]:
    """(name, compute capability) of the first GPU nvidia-smi lists; (None, None) if it cannot say."""
    try:
        code, text = bounded_output(["nvidia-smi", "--query-gpu=name,compute_cap", "--format=csv,noheader"])
    except OSError:
        return None, None
    if code != 0 or not text.strip():
        return None, None
    return parse_compute_cap(text.splitlines()[0])


def parse_compute_cap(line: str) -> tuple[str | None, tuple[int, int] | None]:
    """'NVIDIA H200, 9.0' -> ('NVIDIA H200', (9, 0)); an unreadable capability is None."""
    name, _, cap = line.rpartition(",")
    try:
        major, minor = (int(p) for p in cap.strip().split("."))
    except ValueError:
        return (name.strip() or cap.strip() or None), None
    return name.strip() or None, (major, minor)
