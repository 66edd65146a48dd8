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


def tool_lists():
    """Every list of tool names written in the package: the literal lists
    passed to `ensure_tools` or named TOOLS, and the names run and
    idle-memory build theirs from (`tool_names = [...]`)."""
    import ast
    package = os.path.join(SCRIPTS, "coregate_bench")
    for file in sorted(os.listdir(package)):
        if not file.endswith(".py"):
            continue
        tree = ast.parse(open(os.path.join(package, file)).read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "ensure_tools":
                values = node.args[:1]
            elif isinstance(node, ast.Assign) and any(getattr(t, "id", None) in ("TOOLS", "tool_names") for t in node.targets):
                values = [node.value]
            else:
                continue
            for v in values:
                if isinstance(v, ast.List):
                    yield file, [e.value for e in v.elts if isinstance(e, ast.Constant)]


def test_every_tool_a_subcommand_asks_for_is_known():
    from coregate_bench import tools
    lists = list(tool_lists())
    assert any(f == "fleet.py" for f, _ in lists), "the scan finds fleet-demo's tools"
    for file, names in lists:
        unknown = [n for n in names if n not in tools.TOOLS]
        assert not unknown, f"{file} asks for {unknown}, which tools.TOOLS does not know"
