"""TensorBoard's event files as the trainer derives them (trainer/ml/tbevents.py): records
TensorBoard's own code reads, one event per committed epoch, appended in place, and whatever a
kill or another writer left that disagrees with the history cut before the epochs are written
again. Plus `orch exec`'s command line and the way a machine's bytes are shown here."""

from __future__ import annotations

import io
import struct
from pathlib import Path

from orchestrator.shell import command_line, in_folder
from orchestrator.terminal import byte_sink
from trainer.contract import layout
from trainer.ml.tbevents import EventFiles, crc32c, read_steps


def history(epochs: int) -> list[dict]:
    return [{"epoch": e, "loss": 1 / e, "accuracy": e / 10, "val_loss": 2 / e, "val_accuracy": e / 20, "lr": 0.001}
            for e in range(1, epochs + 1)]


def tensorboard_reads(path: Path) -> list[tuple[int, str, dict[str, float]]]:
    """(step, file_version, {tag: value}) of each event, read with TensorBoard's own CRC and protobuf code."""
    from tensorboard.compat.proto import event_pb2
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

    data, at, events = path.read_bytes(), 0, []
    while at < len(data):
        (size,) = struct.unpack("<Q", data[at:at + 8])
        assert struct.unpack("<I", data[at + 8:at + 12])[0] == masked_crc32c(data[at:at + 8])
        payload = data[at + 12:at + 12 + size]
        assert struct.unpack("<I", data[at + 12 + size:at + 16 + size])[0] == masked_crc32c(payload)
        event = event_pb2.Event.FromString(payload)
        events.append((event.step, event.file_version, {v.tag: round(v.simple_value, 5) for v in event.summary.value}))
        at += 16 + size
    return events


def steps(path: Path) -> list[int]:
    return [step for _end, step in read_steps(path.read_bytes()) if step is not None]


def test_tensorboard_reads_one_event_per_epoch_with_kerass_tags(tmp_path: Path) -> None:
    assert crc32c(b"123456789") == 0xE3069283  # CRC-32C's check value
    EventFiles(tmp_path).publish(history(2), offset=7)  # an extended run: after its parent's step 7
    assert tensorboard_reads(tmp_path / layout.TENSORBOARD_TRAIN) == [
        (0, "brain.Event:2", {}),
        (8, "", {"epoch_loss": 1.0, "epoch_accuracy": 0.1, "epoch_learning_rate": 0.001}),
        (9, "", {"epoch_loss": 0.5, "epoch_accuracy": 0.2, "epoch_learning_rate": 0.001})]
    assert tensorboard_reads(tmp_path / layout.TENSORBOARD_VALIDATION)[1:] == [
        (8, "", {"epoch_loss": 2.0, "epoch_accuracy": 0.05}), (9, "", {"epoch_loss": 1.0, "epoch_accuracy": 0.1})]


def test_epochs_are_appended_in_place_and_what_a_kill_left_is_cut_first(tmp_path: Path) -> None:
    path = tmp_path / layout.TENSORBOARD_VALIDATION
    EventFiles(tmp_path).publish(history(2), 0)
    before = path.read_bytes()
    EventFiles(tmp_path).publish(history(3), 0)  # a new process: it reads what is there
    assert path.read_bytes().startswith(before) and steps(path) == [1, 2, 3]  # appended: a reader keeps its place
    # a kill half-way through writing an epoch's record, then the next start
    path.write_bytes(path.read_bytes()[:-5])
    assert steps(path) == [1, 2]
    EventFiles(tmp_path).publish(history(3), 0)
    assert steps(path) == [1, 2, 3] and tensorboard_reads(path)[-1][0] == 3
    # an epoch the history does not hold (an uncommitted one, another writer's): cut from there
    EventFiles(tmp_path).publish(history(4), 10)
    assert steps(path) == [11, 12, 13, 14]
    writer = EventFiles(tmp_path)
    writer.publish(history(4), 10)
    assert steps(path) == [11, 12, 13, 14]  # nothing to do: nothing written twice
    writer.publish(history(5), 10)
    assert steps(path) == [11, 12, 13, 14, 15]


def test_exec_arguments_and_how_the_machines_bytes_are_shown() -> None:
    assert command_line(["nvidia-smi | head -3"]) == "nvidia-smi | head -3"  # one argument: a command line
    assert command_line(["ls", "-l", "my file", "$HOME"]) == "ls -l 'my file' '$HOME'"  # several: words
    assert in_folder("/r o", "a; b").endswith("|| exit 1\na; b")  # the user's line on its own line

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    shown = Terminal()
    sink = byte_sink(shown)
    for chunk in (b"\x1b]0;pwned\x07ok \xc3", b"\xa9\n"):  # a window-title escape; an é split in two
        sink(chunk)
    assert shown.getvalue() == "\\x1b]0;pwned\\x07ok é\n"

    class Pipe(io.StringIO):
        def __init__(self) -> None:
            super().__init__()
            self.buffer = io.BytesIO()

    piped = Pipe()
    byte_sink(piped)(b"\x1b[31mred\xff\n")
    assert piped.buffer.getvalue() == b"\x1b[31mred\xff\n"  # into a pipe: the bytes as they came
