"""The command's argument parsing: `run` by default, every subcommand with
--dry-run, and lists checked against what exists."""
import os
import subprocess
import sys

import pytest

from coregate_bench import SCRIPTS, build, cli


def parse(*argv):
    return cli.parser().parse_args(cli.with_default(list(argv)))


def test_run_is_the_default_when_an_option_comes_first():
    assert cli.with_default(["--dry-run"]) == ["run", "--dry-run"]
    assert cli.with_default([]) == ["run"]
    assert cli.with_default(["--help"]) == ["--help"]
    assert cli.with_default(["admission", "rate"]) == ["admission", "rate"]


def test_the_gate_command_parses_as_run():
    args = parse("--compare", "base.json", "--results", "run.json")
    assert (args.subcommand, args.compare, args.results, args.cpu_threshold) == ("run", "base.json", "run.json", 0.10)


def test_run_lists():
    args = parse("run", "--proxies", "nginx,coregate-epoll", "--workloads", "get-128,get-128-1000regex")
    assert args.proxies == ["nginx", "coregate-epoll"]
    assert args.workloads == ["get-128", "get-128-1000regex"]
    assert "get-128-1000regex" not in parse("run").workloads


@pytest.mark.parametrize("argv", [["run", "--proxies", "nginx,apache"], ["run", "--workloads", "get-1g"],
                                  ["admission", "everything"], ["fleet-demo", "--only", "exact,nope"],
                                  ["tls", "--proxies", "haproxy"],
                                  ["run", "--baseline", "apache"]])
def test_unknown_names_are_refused(argv, capsys):
    with pytest.raises(SystemExit) as e:
        parse(*argv)
    assert e.value.code == 2


@pytest.mark.parametrize("name", list(cli.SUBCOMMANDS))
def test_every_subcommand_dry_runs_without_a_binary(name, tmp_path):
    # The command as a user runs it, in a process of its own: a dry run
    # needs neither a built binary nor root, and exits 0.
    out = subprocess.run([sys.executable, os.path.join(SCRIPTS, "bench"), name, "--dry-run",
                          "--binary", str(tmp_path / "none"), "--no-build"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip()


def test_the_figure_defaults_to_all():
    assert parse("admission").figure == "all"
    assert parse("balance", "kill").figure == "kill"


def test_another_binary_is_not_built():
    args = parse("run", "--binary", "/x/coregate")
    assert build.build_commands(args, ["coregate"]) == []
    assert build.build_commands(parse("run"), ["coregate"]) == [build.BINARIES["coregate"][1]]
    assert build.build_commands(parse("run", "--no-build"), ["coregate", "nostats"]) == []


def test_dry_runs_print_the_configurations(capsys, tmp_path, monkeypatch):
    # cli.main puts the package on PYTHONPATH for its helper processes;
    # monkeypatch puts the variable back as it was after the test.
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
    # Binaries that do not exist: a dry run must not need them.
    for argv in (["fleet-demo"], ["fleet-cost"], ["admission"], ["balance", "all"]):
        assert cli.main([*argv, "--dry-run", "--binary", str(tmp_path / "none")]) == 0
    out = capsys.readouterr().out
    assert 'scope = "fleet"' in out and 'redis = "redis+unix://WORK/redis.sock"' in out
    # fleet-demo's hosts drain behind a balancer; fleet-cost's stop at once.
    assert out.count('drain_grace = "3s"') == 1 and out.count('drain_grace = "0s"') == 2
    assert 'balance = "round_robin"' in out
