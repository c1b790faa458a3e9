"""orch's command line: one error boundary (one line, exit 2 for usage mistakes), -c anywhere,
--version, completion, exit codes in --help, run ids shown whole, text shown as it is."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from orchestrator import cli
from orchestrator.cli import main


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("orch: error: "), err
    assert "unexpected" not in err and "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("argv, expected", [
    (["bogus"], "No such command 'bogus'"),
    (["monitor", "--interval", "0.1"], "--interval"),
    (["runs", "--bogus"], "No such option: --bogus"),
    (["deploy", "--bogus"], "No such option: --bogus"),  # only what follows `--` is the trainer's
    (["runs", "--epochs", "3"], "No such option: --epochs"),  # a trainer option where no trainer runs
])
def test_usage_mistakes_are_one_line_and_exit_2(argv: list[str], expected: str,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    line = one_error_line(capsys.readouterr().err)
    assert expected in line and "--help" in line


@pytest.mark.parametrize("argv", [["deploy", "--epochs", "3"], ["resume", "r1", "--no-cache"]])
def test_a_trainer_option_given_to_orch_says_where_it_goes(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"{argv[-2] if argv[-1] == '3' else argv[-1]} is a trainer option: give it after `--`" in line


def test_bare_orch_and_bare_groups_show_their_help_once(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    out = capsys.readouterr()
    assert "deploy" in out.out and "monitor" in out.out and "unexpected" not in out.err
    assert out.out.count("Usage:") == 1
    assert main(["config"]) == 2
    out = capsys.readouterr()
    assert "schema" in out.out and out.out.count("Usage:") == 1


def test_flags_show_no_value_in_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["deploy", "--help"]) == 0
    text = capsys.readouterr().out
    assert "--sync-data" in text and "<bool>" not in text and "MINUTES|off" in text


def test_version_and_completion(capsys: pytest.CaptureFixture[str]) -> None:
    from orchestrator import __version__

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"orch {__version__}"
    assert main(["--show-completion", "bash"]) == 0
    assert "complete" in capsys.readouterr().out


def test_help_lists_every_exit_code(capsys: pytest.CaptureFixture[str]) -> None:
    from trainer.contract.exitcodes import MEANINGS

    assert main(["--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for code, (meaning, who) in MEANINGS.items():
        if who in ("both", "orch"):
            assert f"{int(code)} {meaning.split()[0]}" in text


def test_config_before_or_after_the_command_or_from_the_environment(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    path = tmp_path / "my.yaml"
    path.write_text("target: local\ntrain:\n  epochs: 7\n")
    for argv in (["-c", str(path), "config", "check"], ["config", "check", "-c", str(path)],
                 ["--config", str(path), "config", "check"]):
        assert main(argv) == 0, capsys.readouterr().err
        assert json.loads(capsys.readouterr().out)["train"]["epochs"] == 7
    monkeypatch.setenv("ORCH_CONFIG", str(path))
    assert main(["config", "check"]) == 0
    assert json.loads(capsys.readouterr().out)["train"]["epochs"] == 7
    other = tmp_path / "other.yaml"
    other.write_text("target: local\ntrain:\n  epochs: 3\n")
    assert main(["config", "check", "-c", str(other)]) == 0  # the command line wins over the environment
    assert json.loads(capsys.readouterr().out)["train"]["epochs"] == 3


def test_an_unknown_aws_profile_is_an_aws_error(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "aws-credentials"))
    path = tmp_path / "deploy.yaml"
    path.write_text("target: ec2\nec2:\n  name: gpu\n  profile: nope\n")
    assert main(["status", "-c", str(path)]) == 3
    assert "nope" in one_error_line(capsys.readouterr().err)


def test_a_missing_key_file_is_named_before_connecting(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "deploy.yaml"
    path.write_text("target: ssh\nssh:\n  host: 127.0.0.1\n  port: 1\n  key_file: nowhere.pem\n")
    assert main(["runs", "-c", str(path)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"ssh.key_file: {tmp_path / 'nowhere.pem'} does not exist" in line


def test_messages_show_brackets_as_they_are() -> None:
    from orchestrator.context import Output

    output = Output.captured()
    output.log("sent to /data/[x]/set [/x] and x[red]y")  # [/x] used to crash rich's markup parser
    assert "sent to /data/[x]/set [/x] and x[red]y" in output.err.file.getvalue()


def run_rows(ids: list[str]) -> list:
    from trainer.contract.wire import RunInfo

    return [RunInfo(i, state="finished", epoch=3, epochs=3, best_val_accuracy=0.5,
                    started_at="2026-11-21T10:30:15+00:00", updated_at="2026-11-21T10:31:15+00:00") for i in ids]


@pytest.mark.parametrize("terminal_width", [None, 40, 60, 120])
def test_run_ids_are_never_cut(terminal_width: int | None) -> None:
    from rich.console import Console

    from orchestrator.runs import runs_table

    ids = ["20261121-103015-a3f9", "20261121-103015-a3f9-extended-by-hand"]
    out = io.StringIO()
    # None: a pipe (`orch runs | cat`); else a terminal that wide
    console = Console(file=out, markup=False, force_terminal=terminal_width is not None,
                      width=terminal_width or 80)
    cli._print_table(console, runs_table(run_rows(ids)))
    text = out.getvalue()
    for run_id in ids:
        assert run_id in text, text
    assert "…" not in text.split("┃")[1]  # the id column's cells are whole


def test_runs_with_no_runs_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "deploy.yaml"
    path.write_text(f"target: local\nremote:\n  root: {tmp_path / 'root'}\n")
    assert main(["runs", "-c", str(path)]) == 0
    assert "no runs yet" in capsys.readouterr().out


def test_autostop_plan(tmp_path: Path) -> None:
    from orchestrator.autostop import plan
    from orchestrator.config import load_config
    from orchestrator.errors import ConfigError

    path = tmp_path / "deploy.yaml"
    path.write_text("target: ssh\nssh:\n  host: gpu\n")
    cfg = load_config(path)
    assert not plan(cfg, None).change  # nothing said: the machine's setting is left as it is
    assert plan(cfg, "off").change and plan(cfg, "off").idle_minutes is None
    armed = plan(cfg, "30")
    assert (armed.idle_minutes, armed.command) == (30.0, "sudo shutdown -h now")
    for bad in ("soon", "0", "-5", "nan"):
        with pytest.raises(ConfigError):
            plan(cfg, bad)
    path.write_text("target: ssh\nssh:\n  host: gpu\nautostop:\n  idle_minutes: 45\n")
    assert plan(load_config(path), None).idle_minutes == 45


def test_the_readme_iam_policy_lists_exactly_the_actions_orch_calls() -> None:
    import json
    import re

    from orchestrator import ec2

    source = Path(ec2.__file__).read_text()
    # Every boto3 call goes through _call, so its errors are one line: the client's methods are
    # passed to it, never called directly (but for get_waiter, whose .wait is passed).
    assert set(re.findall(r"\b(?:ec2|ssm)\.([a-z_]+)\(", source)) == {"get_waiter"}
    called = {f"{service}:" + "".join(w.title() for w in name.split("_"))
              for service, name in re.findall(r"_call\([^,]+, (ec2|ssm)\.([a-z_]+)", source) if name != "get_waiter"}
    assert {"ec2:RunInstances", "ec2:TerminateInstances", "ec2:DescribeImages", "ssm:GetParameter"} <= called
    called.add("ec2:DescribeInstances")  # what the instance_running/stopped/terminated waiters poll
    called.add("ec2:CreateTags")  # RunInstances may tag what it creates (TagSpecifications) only with it
    assert called == set(ec2.IAM_ACTIONS)
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    policy = json.loads(re.search(r"```json\n\s*(\{.*?\})\s*```", readme, re.S).group(1))
    everything, pass_role = policy["Statement"]
    assert sorted(everything["Action"]) == sorted(ec2.IAM_ACTIONS) and everything["Resource"] == "*"
    # passing an instance profile (ec2.launch.iam_instance_profile) needs PassRole, on its role only
    assert pass_role["Action"] == [ec2.IAM_PASS_ROLE] and pass_role["Resource"] != "*"
    assert "IamInstanceProfile" in source


def test_run_ids_with_brackets_are_shown_as_they_are() -> None:
    from rich.console import Console

    from orchestrator.runs import runs_table

    out = io.StringIO()
    cli._print_table(Console(file=out, markup=False, width=200), runs_table(run_rows(["x[red]y", "a[/b]c"])))
    assert "x[red]y" in out.getvalue() and "a[/b]c" in out.getvalue()


def test_a_prefix_names_a_run_and_an_ambiguous_one_lists_the_candidates() -> None:
    from orchestrator.errors import ConfigError
    from orchestrator.machine import find_run
    from trainer.contract.wire import RunInfo

    runs = [RunInfo(i) for i in ("20261121-103015-a3f9", "20261121-113015-b1c2", "20261122-090000-ffff")]
    assert find_run(runs, "20261122", "host").run_id == "20261122-090000-ffff"
    assert find_run(runs, "20261121-103015-a3f9", "host").run_id == "20261121-103015-a3f9"
    with pytest.raises(ConfigError, match="ambiguous.*20261121-103015-a3f9, 20261121-113015-b1c2"):
        find_run(runs, "20261121", "host")
    with pytest.raises(ConfigError, match="no run 'nope'"):
        find_run(runs, "nope", "host")


def test_relative_remote_paths_are_relative_to_the_login_home(tmp_path: Path) -> None:
    from tests.conftest import local_machine

    m = local_machine(tmp_path)
    assert m.home == os.path.expanduser("~")  # asked of the machine (verb home)
    m.home = "/home/ubuntu"  # as the machine would say
    assert m.expand("audio_emotion") == "/home/ubuntu/audio_emotion"
    assert m.expand("~/x") == "/home/ubuntu/x" and m.expand("/abs") == "/abs"


def test_trainer_help_lists_the_shared_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    from trainer.contract.exitcodes import MEANINGS
    from trainer.ml.cli import main as trainer_main

    assert trainer_main(["--help"]) == 0
    text = capsys.readouterr().out
    for code, (meaning, who) in MEANINGS.items():
        if who in ("both", "trainer"):
            assert f"{int(code)} {meaning[:30]}" in " ".join(text.split())


def test_an_explicit_config_wins_over_the_environment(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    mine, other = tmp_path / "mine.yaml", tmp_path / "other.yaml"
    mine.write_text("target: local\ntrain:\n  epochs: 7\n")
    other.write_text("target: local\ntrain:\n  epochs: 3\n")
    monkeypatch.setenv("ORCH_CONFIG", str(other))
    for argv in (["-c", str(mine), "config", "check"], ["config", "check", "-c", str(mine)]):
        assert main(argv) == 0
        assert json.loads(capsys.readouterr().out)["train"]["epochs"] == 7
    assert main(["config", "schema", "-c", str(mine)]) == 0


def test_no_ssh_config_value_can_start_another_option(tmp_path: Path) -> None:
    from orchestrator.errors import ConfigError
    from orchestrator.sshconfig import Hop, SshTarget, openssh_config

    for host, user in (("127.0.0.1\n  ProxyCommand touch X", "root"), ("h", "root\n  ProxyCommand x"),
                       ("h#x", "root"), ("", "root")):
        with pytest.raises(ConfigError):
            openssh_config(SshTarget(Hop("h", host, 22, user, ()), (), tmp_path / "known", 5))
    text = openssh_config(SshTarget(Hop("h", "10.0.0.5", 22, "ubuntu", (str(tmp_path / "a b%c"),)), (),
                                    tmp_path / "known hosts", 5))
    assert f'IdentityFile "{tmp_path}/a b%%c"' in text and "StrictHostKeyChecking yes" in text


def test_ssh_config_include_is_read_as_openssh_reads_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from orchestrator.config import SshConfig
    from orchestrator.sshconfig import resolve

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".ssh" / "conf.d").mkdir(parents=True)
    key = tmp_path / "gpu.pem"
    key.write_text("not really a key")
    (tmp_path / ".ssh" / "conf.d" / "gpu.conf").write_text(
        f"Host gpubox\n  HostName 10.0.0.5\n  Port 2222\n  User ec2-user\n  IdentityFile {key}\n")
    main_cfg = tmp_path / "main.cfg"
    main_cfg.write_text("Include conf.d/*.conf\nHost *\n  User nobody-else\n")
    target = resolve(SshConfig(host="gpubox", config_file=str(main_cfg)), "gpubox", Path)
    assert (target.hop.hostname, target.hop.port, target.hop.user, target.hop.key_files) == (
        "10.0.0.5", 2222, "ec2-user", (str(key),))


@pytest.mark.parametrize("yaml_text, argv, expected", [
    ("target: local\nssh:\n  connect_timeout: .inf\n", ["config", "check"], "ssh.connect_timeout"),
    ("target: local\nremote:\n  root: ''\n", ["config", "check"], "remote.root"),
    ("target: ec2\nec2:\n  name: gpu\n  endpoint_url: not a url\n", ["status"], "not a url"),
    ("target: local\n", ["monitor", "--interval", "inf"], "--interval"),
    ("target: local\n", ["resume", "r1", "--continue", "--epochs", "50"], "--continue keeps the run's own settings"),
])
def test_more_user_mistakes_are_one_line(yaml_text: str, argv: list[str], expected: str, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "aws-config"))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    path = tmp_path / "deploy.yaml"
    path.write_text(yaml_text)
    code = main([*argv, "-c", str(path)])
    line = one_error_line(capsys.readouterr().err)
    assert code in (2, 3) and expected in line, line


def test_proxyjump_in_uri_form(tmp_path: Path) -> None:
    from orchestrator.config import SshConfig
    from orchestrator.sshconfig import resolve

    cfg = tmp_path / "cfg"
    cfg.write_text("Host gpu\n  HostName 10.0.0.5\n  ProxyJump ssh://jumper@bastion.example:2200\n")
    target = resolve(SshConfig(host="gpu", config_file=str(cfg)), "gpu", Path)
    assert [(j.user, j.hostname, j.port) for j in target.jumps] == [("jumper", "bastion.example", 2200)]


def test_data_remote_dir_slash_is_a_config_error(tmp_path: Path) -> None:
    from orchestrator.config import load_config
    from orchestrator.errors import ConfigError
    from orchestrator.sync import sync_data
    from tests.conftest import local_machine

    (tmp_path / "features").mkdir()
    path = tmp_path / "deploy.yaml"
    path.write_text(f"target: local\ndata:\n  remote_dir: /\n  local_dir: {tmp_path / 'features'}\n")
    with pytest.raises(ConfigError, match="not /"):
        sync_data(local_machine(tmp_path, load_config(path)))


def test_every_command_keeps_its_own_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The shared options are added to a command, never in place of its own (`logs -f` was lost once)."""
    path = tmp_path / "deploy.yaml"
    path.write_text(f"target: local\nremote:\n  root: {tmp_path / 'root'}\n")
    for argv in (["logs", "--follow"], ["logs", "-f"], ["monitor", "--once"], ["stop", "--json"]):
        assert main([*argv, "-c", str(path)]) == 2  # parsed; then: there is no run
        assert "no run" in capsys.readouterr().err, argv
    assert main(["logs", "--help"]) == 0
    assert "--follow" in capsys.readouterr().out


def test_a_helper_python_that_cannot_start_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "deploy.yaml"
    path.write_text(f"target: local\nremote:\n  root: {tmp_path / 'root'}\n  python: /no/such/python3\n")
    assert main(["download", "-c", str(path)]) == 7
    line = one_error_line(capsys.readouterr().err)
    assert "/no/such/python3" in line and "unexpected" not in line


def test_what_terminating_loses_is_said_from_the_runs_on_the_disk() -> None:
    from orchestrator.status import lost_with_disk

    assert "orch could not list them" in lost_with_disk(None)
    assert "no run (there is none on it)" in lost_with_disk([])
    two = lost_with_disk(["20261121-103015-a3f9", "tiny"])
    assert two.startswith("Its disk is deleted with it") and "2 run(s): 20261121-103015-a3f9, tiny" in two
    assert "`orch download RUN` first" in two
    from orchestrator.status import StorageHolds

    held = StorageHolds("s3://b/p", ("tiny",))
    assert "1 run(s): 20261121-103015-a3f9 (" in lost_with_disk(["20261121-103015-a3f9", "tiny"], held)
    assert "no run (all 1 are in s3://b/p)" in lost_with_disk(["tiny"], held)
    assert "that s3://b/p lacks" in lost_with_disk(None, held)


def test_the_readme_storage_policy_lists_exactly_the_s3_actions_orch_and_the_trainer_call() -> None:
    import json
    import re

    from orchestrator import storage
    from trainer.ml import mirror

    # boto3's S3 client methods -> the IAM action each needs (multipart uploads are PutObject)
    action = {"list_objects_v2": "s3:ListBucket", "get_object": "s3:GetObject", "head_object": "s3:GetObject",
              "upload_fileobj": "s3:PutObject", "put_object": "s3:PutObject", "delete_object": "s3:DeleteObject",
              "delete_objects": "s3:DeleteObject"}
    source = Path(storage.__file__).read_text() + Path(mirror.__file__).read_text()
    methods = set(re.findall(r"self\.s3\.([a-z_0-9]+)[(,]", source)) - {"get_paginator"}
    methods |= set(re.findall(r"get_paginator\(\"([a-z_0-9]+)\"\)", source))
    assert methods <= set(action), methods - set(action)  # a new call: add it here, to IAM_ACTIONS and README
    assert {action[m] for m in methods} == set(storage.IAM_ACTIONS)
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    policies = [json.loads(block) for block in re.findall(r"```json\n\s*(\{.*?\})\s*```", readme, re.S)]
    s3_policy = next(p for p in policies if any(a.startswith("s3:") for a in p["Statement"][0]["Action"]))
    assert sorted(s3_policy["Statement"][0]["Action"]) == sorted(storage.IAM_ACTIONS)
