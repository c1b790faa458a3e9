"""Run notifications (deploy.yaml ``notify:``), orch's side: the settings a launch hands the
machine (the webhook, the events, the instance's price per hour when orch knows it), and
``orch notify test``. The messages themselves are sent from the machine
(trainer/machine/notify.py), so they arrive with the laptop closed; the URL travels on stdin,
never on a command line, and is shown only as its scheme and host.
"""

from __future__ import annotations

from orchestrator.context import Context
from orchestrator.errors import ConfigError, OrchError, RemoteError
from orchestrator.machine import Machine
from orchestrator.provision import acquire
from trainer.contract import verbs
from trainer.contract.notify import Settings, redact
from trainer.contract.wire import Delivery


def hourly_price(m: Machine) -> float | None:
    """The machine's USD per hour as `orch status` prices it (EC2), else ec2.hourly_price if set."""
    if m.instance is None:
        return m.cfg.ec2.hourly_price
    from orchestrator import cost, ec2

    inst = m.instance
    try:
        return cost.estimate(m.cfg.ec2, inst, spot_price=lambda: ec2.spot_price(ec2.client(m.cfg.ec2), inst)).hourly_usd
    except OrchError as exc:  # a price is a nicety: the run goes ahead without one
        m.log(f"notify: no price for {inst.instance_id} ({exc}); messages leave the cost out")
        return None


def settings(m: Machine) -> Settings | None:
    """What the machine needs to notify for a run launched now (None: no ``notify:``)."""
    notify = m.cfg.notify
    if notify is None:
        return None
    host = m.instance.instance_id if m.instance is not None else m.remote.host
    return Settings(notify.webhook.get_secret_value(), tuple(notify.on), hourly_price(m), host)


def test(ctx: Context) -> Delivery:
    """One test message, sent from the machine through the runs' own code; RemoteError when the
    webhook did not take it (the answer says why)."""
    if ctx.cfg.notify is None:
        raise ConfigError("deploy.yaml has no notify: section (notify: {webhook: URL}); nothing to test")
    with acquire(ctx) as m:
        given = settings(m)
        assert given is not None
        sent = m.answer(verbs.NOTIFY, "test", stdin=lambda fh: fh.write(given.to_bytes()))
    if not sent.delivered:
        raise RemoteError(f"the test message from {m.remote.host} did not reach {redact(given.webhook)} after "
                          f"{sent.attempts} tr{'y' if sent.attempts == 1 else 'ies'}: {sent.error}")
    return sent
