"""deploy.yaml: every problem is one line naming the file and key, exit code 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator.cli import main
from orchestrator.config import load_config
from orchestrator.deploy import check_run_id, new_run_id, trainer_argv
from orchestrator.errors import ConfigError

CASES = {
    "missing file": (None, "no such file"),
    "not YAML": ("target: [local\n", "line 2 not valid YAML"),
    "a list": ("- local\n", "the top level must be a mapping"),
    "unknown top key": ("target: local\ntargett: x\n", "targett: unknown key"),
    "unknown nested key": ("target: local\nssh:\n  hots: x\n", "ssh.hots: unknown key"),
    "bad target": ("target: gcp\n", "target: Input should be 'ec2', 'ssh' or 'local'"),
    "bad port": ("target: local\nssh:\n  port: 70000\n", "ssh.port: Input should be less than or equal to 65535"),
    "port not a number": ("target: local\nssh:\n  port: twenty\n", "ssh.port: Input should be a valid integer"),
    "ssh without host": ("target: ssh\n", "ssh.host: required when target is ssh"),
    "ec2 without instance": ("target: ec2\n", "ec2: give instance_id or name"),
    "ec2 with both": ("target: ec2\nec2:\n  instance_id: i-1\n  name: gpu\n", "give instance_id or name, not both"),
    "train sets data_dir": ("target: local\ntrain:\n  data_dir: /x\n", "train.data_dir: set by orch itself"),
    "train sets init_from": ("target: local\ntrain:\n  init_from: /x\n", "train.init_from: set by orch itself"),
    "train value a list": ("target: local\ntrain:\n  epochs: [1, 2]\n", "train.epochs: must be an integer >= 1"),
    "train value not a number": ("target: local\ntrain:\n  epochs: ten\n", "train.epochs: must be an integer >= 1 and <= 1000000, got 'ten'"),
    "train key misspelt": ("target: local\ntrain:\n  epoch: 3\n", "train.epoch: unknown key (did you mean epochs?)"),
    "train value out of range": ("target: local\ntrain:\n  batch_size: 0\n", "train.batch_size: must be an integer >= 1"),
    "train choice unknown": ("target: local\ntrain:\n  split: speakers\n", "train.split: must be one of speaker, random, got 'speakers'"),
    "credentials in a URL": ("target: local\nremote:\n  env:\n    index_url: https://bot:s3cret@pypi.example/simple\n",
                             "remote.env.index_url: credentials do not belong in deploy.yaml"),
    "credentials in pip args": ("target: local\nremote:\n  env:\n    pip_args: [--extra-index-url, 'https://t0ken@x/simple']\n",
                                "remote.env.pip_args: credentials do not belong in deploy.yaml"),
    "section not a mapping": ("target: local\nremote: 3\n", "remote: Input should be a valid dictionary"),
    "launch with an instance id": ("target: ec2\nec2:\n  instance_id: i-1\n  launch: {instance_type: g5.xlarge, "
                                   "ami: ami-03cf127a}\n", "ec2.launch: needs ec2.name"),
    "launch without a type": ("target: ec2\nec2:\n  name: gpu\n  launch: {ami: ami-03cf127a}\n",
                              "ec2.launch.instance_type: field required"),
    "launch ami neither id nor parameter": (
        "target: ec2\nec2:\n  name: gpu\n  launch: {instance_type: g5.xlarge, ami: ubuntu-22.04}\n",
        "ec2.launch.ami: give an AMI id (ami-0123456789abcdef0) or the name of an SSM parameter"),
    "launch volume too small": ("target: ec2\nec2:\n  name: gpu\n  launch: {instance_type: g5.xlarge, "
                                "ami: ami-03cf127a, volume_gb: 4}\n", "ec2.launch.volume_gb: Input should be greater "
                                "than or equal to 8"),
    "launch volume too large": ("target: ec2\nec2:\n  name: gpu\n  launch: {instance_type: g5.xlarge, "
                                "ami: ami-03cf127a, volume_gb: 20000}\n", "ec2.launch.volume_gb: Input should be "
                                "less than or equal to 16384"),
    "launch security group not an id": ("target: ec2\nec2:\n  name: gpu\n  launch: {instance_type: g5.xlarge, "
                                        "ami: ami-03cf127a, security_group_ids: [default]}\n",
                                        "ec2.launch.security_group_ids.0: give a sg-... id"),
    "launch spot behaviour": ("target: ec2\nec2:\n  name: gpu\n  launch: {instance_type: g5.xlarge, ami: "
                              "ami-03cf127a, spot: {interruption: hibernate}}\n",
                              "ec2.launch.spot.interruption: Input should be 'terminate' or 'stop'"),
    "launch spot price": ("target: ec2\nec2:\n  name: gpu\n  launch: {instance_type: g5.xlarge, ami: ami-03cf127a, "
                          "spot: {max_price: 0}}\n", "ec2.launch.spot.max_price: Input should be greater than 0"),
    "recover misspelt": ("recover: {max_recovery: 2}\n", "recover.max_recovery: unknown key (did you mean "
                         "max_recoveries?)"),
    "launch key misspelt": ("target: ec2\nec2:\n  name: gpu\n  launch: {instance_type: g5.xlarge, ami: ami-03cf127a, "
                            "volume: 100}\n", "ec2.launch.volume: unknown key (did you mean volume_gb?)"),
    "webhook not http": ("target: local\nnotify: {webhook: 'ftp://hooks.example/T0/s3cret'}\n",
                         "notify.webhook: must be an http:// or https:// URL with a host"),
    "webhook with credentials": ("target: local\nnotify: {webhook: 'https://bot:s3cret@hooks.example/x'}\n",
                                 "notify.webhook: credentials (user:password@) do not belong in the URL"),
    "webhook missing": ("target: local\nnotify: {on: [failed]}\n", "notify.webhook: field required"),
    "notify event unknown": ("target: local\nnotify: {webhook: 'https://h.example/x', on: [done]}\n",
                             "notify.on.0: Input should be 'finished', 'failed', 'interrupted' or 'recovered'"),
    "notify misspelt": ("target: local\nnotify: {webhook: 'https://h.example/x', onn: [failed]}\n",
                        "notify.onn: unknown key (did you mean on?)"),
}


ODD_FILES = {
    "binary": (bytes(range(256)) * 4, "not a UTF-8 text file"),
    "latin-1": ("target: local\nssh:\n  user: jos\xe9\n".encode("latin-1"), "not a UTF-8 text file"),
    "NUL bytes": (b"target: local\n\0\0\0", "not a UTF-8 text file"),
    "duplicate nested key": (b"target: ssh\nssh:\n  host: a.example.com\n  user: x\n  host: b.example.com\n",
                             "line 5: duplicate key 'host' (first given on line 3)"),
    "duplicate top key": (b"target: local\ntarget: ssh\n", "line 2: duplicate key 'target' (first given on line 1)"),
    "duplicate train key": (b"target: local\ntrain:\n  epochs: 1\n  epochs: 2\n", "line 4: duplicate key 'epochs'"),
    "duplicate in a flow mapping": (b"target: local\nssh: {host: a, host: b}\n", "line 2: duplicate key 'host'"),
}


@pytest.mark.parametrize("case", [*CASES, *ODD_FILES])
@pytest.mark.parametrize("command", [["config", "check"], ["deploy"]])
def test_every_config_error_is_one_line_and_exit_2(case: str, command: list[str], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    content, expected = CASES[case] if case in CASES else ODD_FILES[case]
    path = tmp_path / "deploy.yaml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    code = main([*command, "-c", str(path)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith(f"orch: error: {path}: "), err
    assert expected in err and "unexpected" not in err and "s3cret" not in err  # a secret is never repeated


def test_config_check_prints_the_resolved_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "deploy.yaml"
    path.write_text("target: ssh\nssh:\n  host: gpu.example.com\ntrain:\n  epochs: 5\n")
    assert main(["config", "check", "-c", str(path)]) == 0
    resolved = json.loads(capsys.readouterr().out)
    assert resolved["ssh"] == {"host": "gpu.example.com", "port": None, "user": None, "key_file": None,
                               "known_hosts": None, "config_file": "~/.ssh/config", "connect_timeout": 10.0}
    assert resolved["remote"]["root"] == "~/audio_emotion" and resolved["train"]["epochs"] == 5
    from trainer.contract.options import OPTIONS

    # every trainer option with its default (the trainer's own), and none the trainer does not know
    assert set(resolved["train"]) == {o.name for o in OPTIONS if o.in_yaml}
    assert resolved["train"]["batch_size"] == 32
    assert "base_dir" not in resolved


def test_schema_describes_every_field(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert set(schema["properties"]) == {"target", "ec2", "ssh", "remote", "data", "autostop", "monitor", "recover",
                                         "storage", "notify", "train"}
    for section in ("Ec2Config", "Ec2LaunchConfig", "StorageConfig", "SshConfig", "RemoteConfig", "EnvConfig", "DataConfig", "AutostopConfig",
                    "NotifyConfig", "TrainOptions"):
        for name, field in schema["$defs"][section]["properties"].items():
            assert field.get("description"), f"{section}.{name} has no description"


def test_shipped_example_is_valid() -> None:
    import sys

    cfg = load_config(Path(__file__).parents[2] / "deploy.yaml")
    assert cfg.target == "local" and cfg.remote_root.endswith("demo/remote")
    assert cfg.helper_python == sys.executable and not cfg.managed_env  # the demo trains with orch's own Python


def test_relative_paths_resolve_against_the_config_folder(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "deploy.yaml"
    path.parent.mkdir()
    path.write_text("target: local\nremote:\n  root: r\ndata:\n  remote_dir: d\n  local_dir: ../local\n")
    cfg = load_config(path)
    assert cfg.remote_root == str((tmp_path / "sub" / "r").resolve())
    assert cfg.remote_data_dir == f"{cfg.remote_root}/d"
    assert cfg.local_path(cfg.data.local_dir) == tmp_path / "sub" / "../local"


def test_run_ids_sort_by_time_and_are_shell_safe() -> None:
    a = new_run_id()
    assert check_run_id(a) == a and len(a) == len("20261121-103015-a3f9")
    for bad in ("", "-rf", "a b", "x;rm", "$(id)", "a/b", "../up", "é"):
        with pytest.raises(ConfigError):
            check_run_id(bad)


def test_trainer_argv_from_the_train_mapping(tmp_path: Path) -> None:
    path = tmp_path / "deploy.yaml"
    path.write_text("target: local\ntrain:\n  epochs: 5\n  split: speaker\n  mixed_precision: true\n"
                    "  class_weights: false\n  cache: false\n")
    cfg = load_config(path)
    assert trainer_argv(cfg, ["--seed", "3"]) == ["--epochs=5", "--split=speaker", "--mixed-precision",
                                                  "--no-class-weights", "--no-cache", "--seed", "3"]
    # booleans round-trip: what orch writes is what the trainer reads back
    from trainer.contract.options import parse_argv

    assert parse_argv(trainer_argv(cfg)) == {"epochs": 5, "split": "speaker", "mixed_precision": True,
                                             "class_weights": False, "cache": False}
    # an extended run leaves epochs to the recipe, and the split to the parent
    assert trainer_argv(cfg, overrides={"epochs": 7}, extending=True) == ["--mixed-precision", "--no-cache",
                                                                         "--epochs=7"]
    # a value that starts with '-' stays one value
    path.write_text("target: local\ntrain:\n  stats_dir: -odd-folder\n")
    assert parse_argv(trainer_argv(load_config(path))) == {"stats_dir": "-odd-folder"}


@pytest.mark.parametrize("extra, expected", [
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--epoch", "3"], "unrecognized arguments: --epoch 3"),
    (["--epochs", "-3"], "argument --epochs: must be an integer >= 1"),
    (["--batch-size", "0"], "argument --batch-size: must be an integer >= 1"),
    (["--learning-rate", "-0.1"], "argument --learning-rate: must be a number > 0"),
    (["--init-from", "/x"], "--init-from: set by `orch resume`"),
    (["--data-dir", "/x"], "--data-dir: set by orch"),
])
def test_deploy_refuses_bad_trainer_options_before_connecting(extra: list[str], expected: str, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "deploy.yaml"
    # an ssh target nothing listens on: the error must come before any connection is tried
    path.write_text("target: ssh\nssh:\n  host: 127.0.0.1\n  port: 1\n  connect_timeout: 0.5\n")
    assert main(["deploy", "-c", str(path), "--", *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err, err




def test_merge_keys_and_a_byte_order_mark_are_fine(tmp_path: Path) -> None:
    path = tmp_path / "deploy.yaml"
    path.write_bytes(b"\xef\xbb\xbftarget: ssh\nssh:\n  <<: {host: a.example.com, user: u}\n  user: v\n")
    cfg = load_config(path)
    assert (cfg.ssh.host, cfg.ssh.user) == ("a.example.com", "v")  # an explicit key overrides a merged one


def test_a_log_line_with_brackets_is_printed_as_is(capsys: pytest.CaptureFixture[str]) -> None:
    from orchestrator.context import Output

    Output.terminal().log("data: 3 files sent to /data/[raw]/x and [/oops]")
    assert "/data/[raw]/x and [/oops]" in capsys.readouterr().err


def test_storage_takes_an_s3_uri_and_nothing_with_credentials(tmp_path: Path) -> None:
    path = tmp_path / "deploy.yaml"
    path.write_text("target: local\nstorage:\n  s3_uri: s3://my-bucket/team/emotion/\n")
    cfg = load_config(path)
    assert cfg.storage is not None and cfg.storage.s3_uri == "s3://my-bucket/team/emotion"
    for bad, why in (("https://my-bucket/x", "is not an s3://bucket"), ("s3://B/x", "is not an s3://bucket"),
                     ("s3://my-bucket/x", None)):
        path.write_text(f"target: local\nstorage:\n  s3_uri: {bad}\n  endpoint_url: http://user:pw@127.0.0.1:9\n")
        with pytest.raises(ConfigError) as exc:
            load_config(path)
        assert ("storage.s3_uri" in str(exc.value) and why in str(exc.value)) if why else \
            "storage.endpoint_url: credentials do not belong" in str(exc.value), str(exc.value)
