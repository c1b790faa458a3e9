"""The pure parts of spot instances: the InstanceMarketOptions built from ec2.launch.spot, which
of EC2's refusals are NoCapacity (what a recovery retries), RunInstances asked again only while
EC2 throttles (with one ClientToken), and the spot request cancelled before a terminate (EC2
answered by botocore's Stubber: moto makes no spot request for RunInstances on its own)."""

from __future__ import annotations

from typing import Any

import pytest

from orchestrator import ec2
from orchestrator.config import Ec2SpotConfig
from orchestrator.errors import AwsError, ExitCode, NoCapacity


@pytest.mark.parametrize("spot, options", [
    ({}, {"SpotInstanceType": "one-time", "InstanceInterruptionBehavior": "terminate"}),
    ({"interruption": "stop", "max_price": 0.5},
     {"SpotInstanceType": "persistent", "InstanceInterruptionBehavior": "stop", "MaxPrice": "0.5"}),
    ({"max_price": 0.00001}, {"SpotInstanceType": "one-time", "InstanceInterruptionBehavior": "terminate",
                              "MaxPrice": "0.00001"}),  # never "1e-05"
])
def test_the_market_options_come_from_the_spot_section(spot: dict, options: dict) -> None:
    assert ec2.market_options(Ec2SpotConfig(**spot)) == {"MarketType": "spot", "SpotOptions": options}


def client_error(code: str, message: str = "a message.", status: int = 400) -> Exception:
    from botocore.exceptions import ClientError

    return ClientError({"Error": {"Code": code, "Message": message}, "ResponseMetadata": {"HTTPStatusCode": status}},
                       "RunInstances")


def refused(code: str) -> AwsError:
    def fn() -> None:
        raise client_error(code)

    with pytest.raises(AwsError) as caught:
        ec2._call("creating the instance", fn)
    return caught.value


@pytest.mark.parametrize("code", sorted(ec2.CAPACITY_CODES))
def test_capacity_and_price_refusals_are_no_capacity(code: str) -> None:
    err = refused(code)
    assert isinstance(err, NoCapacity) and err.code == code and err.exit_code == ExitCode.AWS == 3
    assert err.detail == f"{code}: a message" and "\n" not in str(err)


@pytest.mark.parametrize("code", ["VcpuLimitExceeded", "InstanceLimitExceeded", "Unsupported",
                                  "InsufficientFreeAddressesInSubnet", "InvalidParameterCombination",
                                  "UnauthorizedOperation", "RequestLimitExceeded", "InvalidAMIID.NotFound"])
def test_other_refusals_are_not(code: str) -> None:
    err = refused(code)
    assert type(err) is AwsError and err.code == code


def test_run_instances_is_asked_again_only_while_ec2_throttles_and_with_one_token(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ec2.time, "sleep", lambda seconds: None)
    answers: list[Exception | dict] = [client_error("RequestLimitExceeded", status=503),
                                       client_error("InternalError", status=500), {"Instances": [{"InstanceId": "i-1"}]}]
    asked: list[dict] = []

    class Client:
        def run_instances(self, **params: Any) -> dict:
            asked.append(params)
            answer = answers.pop(0)
            if isinstance(answer, Exception):
                raise answer
            return answer

    assert ec2._run(Client(), {"ImageId": "ami-1"}) == {"InstanceId": "i-1"}
    assert len(asked) == 3 and len({a["ClientToken"] for a in asked}) == 1  # one request, asked three times
    answers[:] = [client_error("InsufficientInstanceCapacity", status=500), {"Instances": [{"InstanceId": "i-2"}]}]
    with pytest.raises(NoCapacity):
        ec2._run(Client(), {"ImageId": "ami-1"})
    assert len(asked) == 4  # a refusal is never asked again here (the recovery backs off)


def stubbed() -> tuple[Any, Any]:
    import boto3
    from botocore.stub import Stubber

    client = boto3.client("ec2", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x")
    return client, Stubber(client)


def described(state: str, **extra: str) -> dict:
    return {"Reservations": [{"Instances": [{"InstanceId": "i-1", "State": {"Name": state}, **extra}]}]}


@pytest.mark.parametrize("cancel", [None, "cancelled", "InvalidSpotInstanceRequestID.NotFound"])
def test_terminate_cancels_the_spot_request_first(cancel: str | None) -> None:
    client, stub = stubbed()
    ids = {"InstanceIds": ["i-1"]}
    if cancel is None:  # on-demand (or a spot instance EC2 names no request of): nothing to cancel
        stub.add_response("describe_instances", described("running"), ids)
    else:
        stub.add_response("describe_instances", described("running", InstanceLifecycle="spot",
                                                          SpotInstanceRequestId="sir-1"), ids)
        if cancel == "cancelled":
            stub.add_response("cancel_spot_instance_requests", {"CancelledSpotInstanceRequests": [
                {"SpotInstanceRequestId": "sir-1", "State": "cancelled"}]}, {"SpotInstanceRequestIds": ["sir-1"]})
        else:  # EC2 no longer knows it: already gone, terminate anyway
            stub.add_client_error("cancel_spot_instance_requests", cancel, "gone",
                                  expected_params={"SpotInstanceRequestIds": ["sir-1"]})
    stub.add_response("terminate_instances", {"TerminatingInstances": []}, ids)
    stub.add_response("describe_instances", described("terminated"), ids)  # the waiter
    stub.add_response("describe_instances", described("terminated"), ids)
    said: list[str] = []
    with stub:
        assert ec2.terminate(client, "i-1", log=said.append).state == "terminated"
    stub.assert_no_pending_responses()
    assert any("cancelling spot request sir-1" in line for line in said) == (cancel is not None)


def test_a_cancel_that_fails_otherwise_stops_the_terminate() -> None:
    client, stub = stubbed()
    stub.add_response("describe_instances", described("running", SpotInstanceRequestId="sir-1"))
    stub.add_client_error("cancel_spot_instance_requests", "UnauthorizedOperation", "not allowed")
    with stub, pytest.raises(AwsError, match="AWS refused cancelling the spot request: not allowed"):
        ec2.terminate(client, "i-1")
    stub.assert_no_pending_responses()  # TerminateInstances was never asked: the request would relaunch it


def test_stopping_a_one_time_spot_instance_says_what_ends_it() -> None:
    from orchestrator.config import Ec2Config

    client, stub = stubbed()
    stub.add_response("describe_instances", described("running", InstanceLifecycle="spot",
                                                      SpotInstanceRequestId="sir-1"))
    stub.add_client_error("stop_instances", "UnsupportedOperation", "You can't stop the Spot Instance 'i-1' because "
                          "it is associated with a one-time Spot Instance request.")
    with stub, pytest.raises(AwsError, match=r"cannot be stopped: `orch down --terminate` ends it"):
        ec2.stop(client, Ec2Config(instance_id="i-1"))
