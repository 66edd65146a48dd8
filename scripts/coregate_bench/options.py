"""The argparse types the subcommands share: a comma list of known names
(proxies, workloads, parts of a demo)."""
import argparse


def names(known):
    """An argparse type: a comma list of names out of KNOWN."""
    def parse(text):
        got = [n for n in text.split(",") if n]
        for n in got:
            if n not in known:
                raise argparse.ArgumentTypeError(f"unknown name {n}; known: {', '.join(known)}")
        return got
    parse.__name__ = "list"
    return parse
