"""The recovery loop's decisions (orchestrator/recover.py judge and Budget): pure logic, so
every combination of what EC2 and the machine say is checked here; the integration tests
(tests/integration/test_spot.py) run the loop for real."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from orchestrator.ec2 import Instance
from orchestrator.recover import NOTICE_GRACE_S, Budget, Seen, judge
from trainer.contract import layout
from trainer.contract.wire import DIED

NOW = 1_000_000.0


def inst(state: str, reason: str | None = None) -> Instance:
    return Instance("i-0abc", state, None, "127.0.0.1", "gpu", "g5.xlarge", spot=True, state_reason=reason)


def run(state: str, noticed_at: float | None = None) -> SimpleNamespace:
    interruption = SimpleNamespace(noticed_at=noticed_at) if noticed_at is not None else None
    return SimpleNamespace(run_id="r1", shown_state=state, interruption=interruption, error=None,
                           final=state != layout.RUNNING)


@pytest.mark.parametrize("seen, last, action, in_place", [
    # only EC2's word makes a preemption
    (Seen(inst("terminated", "Server.SpotInstanceTermination")), run(layout.RUNNING), "preempted", False),
    (Seen(inst("stopped", "Server.SpotInstanceShutdown")), run(layout.RUNNING), "preempted", False),
    (Seen(inst("terminated", "Client.UserInitiatedShutdown")), run(layout.INTERRUPTED, NOW), "preempted", False),
    (Seen(inst("stopped", "Client.UserInitiatedShutdown")), run(layout.INTERRUPTED, NOW), "preempted", False),
    # the user (or autostop) took the machine: not a preemption, the watch ends
    (Seen(inst("terminated", "Client.UserInitiatedShutdown")), run(layout.RUNNING), "ended", False),
    (Seen(inst("stopped", "Client.InstanceInitiatedShutdown")), run(layout.FINISHED), "ended", False),
    # being taken: wait for EC2's last word
    (Seen(inst("stopping", "Server.SpotInstanceShutdown")), run(layout.RUNNING), "wait", False),
    (Seen(inst("shutting-down")), run(layout.INTERRUPTED, NOW), "wait", False),
    (Seen(inst("pending")), run(layout.INTERRUPTED, NOW), "wait", False),
    # SSH failing while EC2 says running is never a preemption; nor is an EC2 that cannot be asked
    (Seen(inst("running"), ssh_error="timed out"), run(layout.RUNNING), "wait", False),
    (Seen(inst("running"), ssh_error="timed out"), run(layout.INTERRUPTED, NOW), "wait", False),
    (Seen(ec2_error="Could not connect to the endpoint URL"), run(layout.RUNNING), "wait", False),
    (Seen(ec2_error="Could not connect"), run(layout.INTERRUPTED, NOW - 10 * NOTICE_GRACE_S), "wait", False),
    # the machine answers
    (Seen(inst("running"), run=run(layout.RUNNING)), None, "wait", False),
    (Seen(inst("running"), run=run(layout.INTERRUPTED, NOW - 5)), None, "wait", False),
    (Seen(inst("running"), run=run(layout.INTERRUPTED, NOW - NOTICE_GRACE_S - 1)), None, "preempted", True),
    (Seen(inst("running"), run=run(layout.FAILED)), None, "crashed", False),
    (Seen(inst("running"), run=run(DIED)), None, "crashed", False),
    (Seen(inst("running"), run=run(layout.FINISHED)), None, "ended", False),
    (Seen(inst("running"), run=run(layout.STOPPED)), None, "ended", False),
    # target ssh/local: no EC2; an interrupted run is continued where it is
    (Seen(None, run=run(layout.INTERRUPTED, NOW)), None, "preempted", True),
    (Seen(None, ssh_error="refused"), run(layout.RUNNING), "wait", False),
])
def test_only_ecs_word_makes_a_preemption(seen: Seen, last: object, action: str, in_place: bool) -> None:
    decision = judge(seen, last, NOW)
    assert (decision.action, decision.in_place) == (action, in_place), decision.why


def test_the_budget_counts_recoveries_in_the_window_and_backs_off_between_failed_attempts() -> None:
    budget = Budget(limit=2, window_s=100.0, base_s=60.0)
    assert budget.allows(0.0)
    assert [budget.backoff() for _ in range(6)] == [60, 120, 240, 480, 960, 960]
    budget.spent(0.0)
    assert budget.backoff() == 60  # a success resets the error clock
    budget.spent(50.0)
    assert not budget.allows(99.0)  # two recoveries within 100 s
    assert budget.allows(100.0)  # the first left the window


def test_a_terminated_instance_without_a_spec_or_storage_is_given_up_at_once(tmp_path) -> None:  # noqa: ANN001
    from orchestrator.config import DeployConfig
    from orchestrator.context import Context
    from orchestrator.recover import Watch

    def watch(**cfg: object) -> Watch:
        config = DeployConfig.model_validate({"target": "ec2", "base_dir": tmp_path, **cfg})
        return Watch(Context(config), "r1")

    taken = Seen(inst("terminated", "Server.SpotInstanceTermination"))
    named = {"ec2": {"instance_id": "i-0abc"}}
    assert "no ec2.launch" in (watch(**named)._cannot_replace(taken) or "")
    launch = {"ec2": {"name": "gpu", "launch": {"instance_type": "g5.xlarge", "ami": "ami-03cf127a"}}}
    assert "no storage mirror" in (watch(**launch)._cannot_replace(taken) or "")
    stored = {**launch, "storage": {"s3_uri": "s3://bucket/runs"}}
    assert watch(**stored)._cannot_replace(taken) is None
    assert watch(**named)._cannot_replace(Seen(inst("stopped", "Server.SpotInstanceShutdown"))) is None


def test_ecs_errors_are_told_apart_gone_wait_or_end(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    from orchestrator import ec2
    from orchestrator.config import DeployConfig
    from orchestrator.context import Context
    from orchestrator.errors import AwsError
    from orchestrator.recover import Watch

    config = DeployConfig.model_validate({"target": "ec2", "ec2": {"instance_id": "i-0abc"}, "base_dir": tmp_path})
    w = Watch(Context(config), "r1")
    w.instance_id = "i-0abc"

    def fails(code: str) -> None:
        def describe(_client: object, _iid: str) -> None:
            raise AwsError(f"AWS error: {code}", code)
        monkeypatch.setattr(ec2, "describe", describe)
        monkeypatch.setattr(type(w.provider), "client", property(lambda _self: object()))

    fails("InvalidInstanceID.NotFound")  # EC2 has forgotten it: terminated
    inst, error = w._instance()
    assert inst is not None and inst.state == "terminated" and inst.instance_id == "i-0abc" and error is None
    for transient in ("", "RequestLimitExceeded", "InternalError", "Unavailable"):  # the network, EC2's trouble
        fails(transient)
        assert w._instance()[0] is None and w._instance()[1]
    for fatal in ("ExpiredToken", "UnauthorizedOperation", "AuthFailure"):  # waiting cannot fix it: the watch ends
        fails(fatal)
        with pytest.raises(AwsError):
            w._instance()
