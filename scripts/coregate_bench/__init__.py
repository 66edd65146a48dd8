"""coregate's benchmarks, one package behind one command: `scripts/bench`.

Layout:
- cli:         the command, its subcommands and the options they share
- options:     the argparse types subcommands share (a comma list of names)
- proctree:    a process and its descendants from /proc: CPU time, RSS
- procs:       processes a run starts (pinned, in a network namespace),
               waiting with a deadline, the files limit
- tools:       finding, installing and versioning wrk, oha, nginx ...;
               the machine a run was made on
- build:       the coregate binaries a run needs, built unless told not to
- configs:     nginx, HAProxy, Envoy and coregate configurations
- proxies:     each proxy's command line, start and configuration check
- loads:       wrk and oha runs and what they report
- summary:     medians, paired ratios, percentiles, a workload's summary
- gate:        the regression gate against a baseline run
- report:      the Markdown table and SVG curves of a `run`
- idle:        resident memory per idle connection
- callgrind:   instructions per request under callgrind
- run:         `run`, the side-by-side benchmark (the default subcommand)
- idle_memory: `idle-memory`, only the idle-connection part of `run`
- profile:     `profile`, where one request's CPU time goes
- figures:     what `admission` and `balance` share: a coregate from a
               config text, its refusal counters, tables
- openloop:    the open-loop load generator (a process of its own)
- origins:     the built-in origin's command line; the slow origins of
               those figures (a process of its own)
- loris:       the slow-loris herd (a process of its own)
- admission:   `admission`, rate limit, fair queuing, decode guard, loris
- balance:     `balance`, a slow backend and a killed backend
- sides:       what `tls` and `ws` share: nginx beside coregate, rounds,
               paired ratios, the report files
- tls:         `tls`, HTTPS against nginx
- ws:          `ws`, WebSocket tunnels against nginx
- fleet:       `fleet-demo`, a fleet in network namespaces
- fleet_cost:  `fleet-cost`, a fleet-scoped limit's instructions per request
"""
import os

SCRIPTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT = os.path.dirname(SCRIPTS)
