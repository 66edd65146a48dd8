"""The binaries the subcommands run, and building them: coregate from
target/release (or --binary, used as it is), the build without statistics,
the uring_spike example and the ws-load crate. Unless --no-build or
--binary, what a run needs is built with cargo first."""
import os
import subprocess

from . import ROOT

COREGATE = os.path.join(ROOT, "target", "release", "coregate")

# name: (path, the cargo command that builds it)
BINARIES = {
    "coregate": (COREGATE, ["cargo", "build", "--release", "--quiet"]),
    "nostats": (os.path.join(ROOT, "target", "nostats", "release", "coregate"),
                ["cargo", "build", "--release", "--quiet", "--no-default-features", "--target-dir", "target/nostats"]),
    "spike": (os.path.join(ROOT, "target", "release", "examples", "uring_spike"),
              ["cargo", "build", "--release", "--quiet", "--examples"]),
    "ws-load": (os.path.join(ROOT, "target", "ws-load", "release", "ws-load"),
                ["cargo", "build", "--release", "--quiet", "--manifest-path", "scripts/ws-load/Cargo.toml",
                 "--target-dir", "target/ws-load"]),
}


def add_arguments(ap):
    ap.add_argument("--binary", default=COREGATE,
                    help="the coregate binary (default: target/release/coregate, built first); "
                         "another path is used as it is")
    ap.add_argument("--no-build", action="store_true", help="build nothing: use the binaries as they are")


def paths(args):
    """Each binary's path: --binary for coregate, the default for the rest."""
    out = {name: path for name, (path, _) in BINARIES.items()}
    out["coregate"] = os.path.abspath(args.binary)
    return out


def build_commands(args, names):
    """The cargo commands that would build NAMES for this run."""
    if args.no_build:
        return []
    return [BINARIES[n][1] for n in names if not (n == "coregate" and os.path.abspath(args.binary) != COREGATE)]


def ensure(args, names):
    """Builds NAMES (where the options allow) and returns every binary's
    path; stops when one of NAMES is not there."""
    for cmd in build_commands(args, names):
        subprocess.run(cmd, cwd=ROOT, check=True)
    found = paths(args)
    for n in names:
        if not os.access(found[n], os.X_OK):
            raise SystemExit(f"no {n} binary at {found[n]}; build it: {' '.join(BINARIES[n][1])}")
    return found
