"""The command: `scripts/bench SUBCOMMAND [options]`. Every subcommand
takes --dry-run (print the plan and the configurations, run nothing, need
no root) and --binary/--no-build; `run` is the default, so
`scripts/bench --dry-run` and `scripts/bench --compare BASELINE.json`
are `run`'s."""
import argparse
import os
import sys

from . import SCRIPTS, admission, balance, build, fleet, fleet_cost, idle_memory, profile, run, tls, ws

SUBCOMMANDS = {
    "run": run,
    "idle-memory": idle_memory,
    "profile": profile,
    "admission": admission,
    "balance": balance,
    "tls": tls,
    "ws": ws,
    "fleet-demo": fleet,
    "fleet-cost": fleet_cost,
}


def parser():
    ap = argparse.ArgumentParser(prog="scripts/bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)
    for name, module in SUBCOMMANDS.items():
        sp = sub.add_parser(name, help=module.__doc__.splitlines()[0], description=module.__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(sp)
        build.add_arguments(sp)
        sp.add_argument("--dry-run", action="store_true", help="print the plan and the configurations, run nothing")
    return ap


def with_default(argv):
    """ARGV with `run` put first when it starts with one of run's options."""
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        return ["run", *argv]
    return argv


def main(argv):
    argv = with_default(argv)
    args = parser().parse_args(argv)
    args.command = "scripts/bench " + " ".join(argv)
    # The helper processes (`python3 -m coregate_bench.openloop` ...) find
    # the package the way this process did.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [SCRIPTS, os.environ.get("PYTHONPATH")]))
    return SUBCOMMANDS[args.subcommand].main(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
