"""`orch status`'s lines: accuracies rounded as everywhere else, nothing printed as `None`."""

from __future__ import annotations

from orchestrator.status import MachineStatus
from orchestrator.views import status_lines
from trainer.contract.wire import MachineReport, RunInfo


def lines_for(*runs: RunInfo) -> list[str]:
    return status_lines(MachineStatus("ssh", None, "box", MachineReport(runs=list(runs))))


def test_a_running_run_shows_its_best_rounded_and_before_its_first_epoch_no_none() -> None:
    late = RunInfo("r1", state="running", alive=True, epoch=3, epochs=5, best_val_accuracy=0.5092024803161621)
    early = RunInfo("r2", state="running", alive=True, epoch=0, epochs=5)
    text = "\n".join(lines_for(late, early))
    assert "running: r1 epoch 3/5, best 0.5092\n" in text + "\n"
    assert "running: r2 epoch 0/5, no epoch finished yet" in text
    assert "None" not in text and "0.50920" not in text
