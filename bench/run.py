"""Benchmark jobserver against gearmand and gear's geard, side by side, in one run.

    python -m bench.run [--quick] [--rounds 3] [--out bench/RESULTS.md] [--postgresql]

Every scenario runs against every server, each time on a freshly started server on a free
127.0.0.1 port; within a round the servers alternate (and the order rotates from round to
round), so slow drifts of the machine spread over all of them. The table of medians, min-max
spread and ratio to gearmand is printed and written to --out. Exit status 1 when any run
failed (the table then lists the errors).

`--postgresql` adds the PostgreSQL store (issue 12): a column jobserver-postgresql, served by
a private PostgreSQL cluster started for the run, and after the rounds the takeover time of a
killed server's jobs (bench/takeover.py). Just those, against the other stores:

    python -m bench.run --postgresql --scenarios bc \
        --servers jobserver-memory,jobserver-sqlite,jobserver-postgresql

and only the takeover: `--postgresql --scenarios ''`.

`--tls` (or naming jobserver-tls in `--servers`) adds the column jobserver-tls (issue 15): the
memory store with mutual TLS on its port, certificates made for the run (bench/tls.py), and
every load process speaking TLS to it; a section compares it with jobserver-memory. The
foreground jobs over TLS against plaintext:

    python -m bench.run --servers jobserver-memory,jobserver-tls --scenarios d

`--floor` (or naming trio-floor in `--servers`) adds the column trio-floor (issue 16) for
(a)-(d): bench/trio_floor.py, the scenarios' job routing on trio with nothing else, i.e. what
Python and trio alone reach here in the I/O style jobserver uses; and for (b) two columns of
jobserver whose store only waits (bench/waiting_store.py), the floor of the durable path:

    python -m bench.run --floor --scenarios abcd --servers trio-floor,jobserver-memory,gearmand

`--scaling` measures scaling by processes instead (issue 16, bench/scaling.py): jobserver as
1, 2 and 4 processes and gearmand with --threads=1 and 2 (and as 2 and 4 processes), the load
spread over them, foreground jobs/s and background submits/s in total. It runs none of the
scenarios unless --scenarios is given too; write it away from the main table:

    python -m bench.run --scaling --out /tmp/scaling.md
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import shlex
import shutil
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

if __package__ in (None, ""):  # `python bench/run.py`: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import report, scaling, servers, takeover
from bench.loadproc import LoadProcessError
from bench.postgres import BenchPostgres, PostgresUnavailable
from bench.scenarios import (
    FULL,
    METRICS,
    QUICK,
    SCENARIOS,
    Scenario,
    ScenarioError,
    Sizes,
    describe,
)
from bench.servers import ServerSpec, ServerStartError
from bench.tls import CertificatesUnavailable, RunCertificates

DEFAULT_OUT = Path(__file__).resolve().parent / "RESULTS.md"
TLS_COLUMN = report.TLS


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (the CI smoke run)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default 3; 1 quick)")
    parser.add_argument("--out", type=Path, default=None, help=f"markdown (default {DEFAULT_OUT})")
    parser.add_argument("--json", type=Path, default=None, help="also write raw figures as JSON")
    parser.add_argument(
        "--scenarios",
        default=None,
        help="which scenarios, e.g. 'bd' (default all, none with --scaling; '' for none, e.g. "
        "only the takeover)",
    )
    parser.add_argument(
        "--servers",
        default=None,
        help="comma-separated server names to run (default all: ceiling, jobserver-memory, "
        "jobserver-sqlite, gearmand, geard; jobserver-postgresql with --postgresql; "
        "jobserver-tls with --tls or when named here); with --scaling also which of ceiling, "
        "jobserver-memory and gearmand to scale",
    )
    parser.add_argument(
        "--postgresql",
        action="store_true",
        help="also run jobserver with the postgresql store (column jobserver-postgresql; a "
        "private PostgreSQL cluster for the run, a fresh database per server) and measure the "
        "takeover time of a killed server's jobs",
    )
    parser.add_argument(
        "--tls",
        action="store_true",
        help="also run jobserver-memory with mutual TLS on its port (column jobserver-tls; "
        "certificates made for the run with trustme) and compare it with plaintext",
    )
    parser.add_argument(
        "--floor",
        action="store_true",
        help="also run bench/trio_floor.py (column trio-floor) in (a)-(d): the scenarios' job "
        "routing on trio and nothing else; and in (b) jobserver with stores that only wait "
        "(bench/waiting_store.py)",
    )
    parser.add_argument(
        "--takeover-leases",
        default=None,
        help="with --postgresql: comma-separated --lease values to measure the takeover with, "
        "once each (default 3,10; 3 quick); 'none' skips the takeover",
    )
    parser.add_argument(
        "--takeover-jobs",
        type=int,
        default=None,
        help="background jobs on the server that is killed (default 1000; 100 quick)",
    )
    parser.add_argument(
        "--scaling",
        action="store_true",
        help="measure scaling by processes (issue 16): N servers of each kind, the load spread "
        "over them (bench/scaling.py); runs no scenario unless --scenarios says which",
    )
    parser.add_argument(
        "--scaling-processes",
        default=",".join(map(str, scaling.PROCESSES)),
        help="with --scaling: comma-separated process counts (default %(default)s)",
    )
    parser.add_argument("--gearmand-threads", type=int, default=servers.GEARMAND_THREADS)
    parser.add_argument(
        "--idle-connections", type=int, default=None, help="for (f); default 10,000 (200 quick)"
    )
    parser.add_argument("--no-install", action="store_true", help="never pip install gear")
    parser.add_argument(
        "--geard-nodelay",
        action="store_true",
        help="also run geard with TCP_NODELAY on its connections (column geard-nodelay)",
    )
    args = parser.parse_args(argv)
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.scenarios is None:
        args.scenarios = "" if args.scaling else "abcdef"
    try:
        args.processes = sorted({int(n) for n in args.scaling_processes.split(",") if n})
    except ValueError:
        parser.error(f"--scaling-processes: not numbers: {args.scaling_processes!r}")
    if not args.processes or args.processes[0] < 1:
        parser.error("--scaling-processes: at least one count, each at least 1")
    unknown = set(args.scenarios) - {s.key for s in SCENARIOS}
    if unknown:
        parser.error(f"unknown scenarios {''.join(sorted(unknown))}")
    if args.takeover_leases is None:
        args.takeover_leases = "3" if args.quick else "3,10"
    if args.takeover_jobs is None:
        args.takeover_jobs = 100 if args.quick else 1000
    try:
        args.leases = [
            float(x) for x in args.takeover_leases.split(",") if x and x.lower() != "none"
        ]
    except ValueError:
        parser.error(f"--takeover-leases: not numbers: {args.takeover_leases!r}")
    if any(lease < 1 for lease in args.leases):
        parser.error("--takeover-leases: jobserver's --lease is at least 1")
    if args.takeover_jobs < 1:
        parser.error("--takeover-jobs must be at least 1")
    if args.servers and TLS_COLUMN in args.servers.split(","):
        args.tls = True
    if args.servers and {servers.FLOOR, *servers.STORE_WAITS} & set(args.servers.split(",")):
        args.floor = True
    return args


def raise_fd_limit(needed: int) -> None:
    """Servers and load processes inherit our RLIMIT_NOFILE; make it fit the idle scenario."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (needed, needed))  # root may raise it
            return
        except (ValueError, OSError):
            sys.exit(
                f"bench: (f) needs {needed} open files but the hard limit is {hard}; "
                "use --idle-connections or raise the limit (ulimit -Hn)"
            )
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def server_lineup(
    args: argparse.Namespace,
    sizes: Sizes,
    fd_limit: int,
    postgres: BenchPostgres | str | None,
    certificates: RunCertificates | str | None = None,
) -> tuple[list[ServerSpec], dict[str, str], str | None]:
    """The servers to run, those left out with the reason, and gear's version. `postgres`:
    the run's PostgreSQL cluster, or why there is none (with --postgresql), or None;
    `certificates` likewise for the TLS column (with --tls)."""
    lineup = [servers.canned_spec(sizes.payload), *servers.jobserver_specs()]
    if args.floor:
        lineup.insert(1, servers.trio_floor_spec())
        lineup[3:3] = servers.waiting_store_specs()  # beside the memory and sqlite stores
    skipped: dict[str, str] = {}
    if isinstance(postgres, BenchPostgres):
        lineup.append(postgres.jobserver_spec())
    elif isinstance(postgres, str):
        skipped["jobserver-postgresql"] = postgres
    if isinstance(certificates, RunCertificates):
        lineup.append(servers.jobserver_tls_spec(certificates))
    elif isinstance(certificates, str):
        skipped[TLS_COLUMN] = certificates
    lineup.append(servers.gearmand_spec(args.gearmand_threads, fd_limit))
    if shutil.which(servers.GEARMAND) is None:
        lineup.pop()
        skipped["gearmand"] = f"{servers.GEARMAND} is not installed (Debian gearman-job-server)"
    if args.no_install:
        gear_path, gear_version, reason = None, servers._gear_version(None), "--no-install"
    else:
        gear_path, gear_version, reason = servers.provide_gear()
    if gear_version:
        lineup.append(servers.gear_spec(gear_path))
        if args.geard_nodelay:
            lineup.append(servers.gear_spec(gear_path, nodelay=True))
    else:
        skipped["geard"] = reason or "gear is not installed"
    if args.servers:
        wanted = set(args.servers.split(","))
        lineup = [spec for spec in lineup if spec.name in wanted]
    return lineup, skipped, gear_version


def setup_notes(
    lineup: list[ServerSpec], args: argparse.Namespace, postgres_version: str
) -> dict[str, str]:
    text = {
        "ceiling": "bench/canned_server.py, canned replies: the load generator's ceiling",
        "jobserver-memory": "`python -m jobserver --store memory`",
        "jobserver-sqlite": "`python -m jobserver --store sqlite`, fresh --data-dir per run",
        "jobserver-postgresql": "`python -m jobserver --store postgresql://...` (--lease 10), "
        f"a fresh database per run in a private PostgreSQL {postgres_version} cluster on this "
        "machine (fsync and synchronous_commit on; pg_stat_statements loaded to count statements)",
        "jobserver": "`python -m jobserver` (no --store option in this checkout)",
        "gearmand": f"`gearmand --threads={args.gearmand_threads}`, empty config file",
        "geard": "gear's `geard -d`, logging at WARNING; it ignores ECHO_REQ, so its (a) and (f) "
        "latency figures are GET_STATUS round trips",
        "geard-nodelay": "geard as above with TCP_NODELAY set on every accepted connection "
        "(geard as shipped leaves Nagle on)",
    }
    return {spec.name: text.get(spec.name, spec.note) for spec in lineup}


def run_one(spec: ServerSpec, scenario: Scenario, sizes: Sizes) -> dict[str, float]:
    """Start `spec`, run `scenario` on it, stop it. Raises ScenarioError with the reason."""
    logs = Path(tempfile.mkdtemp(prefix=f"bench-load-{spec.name}-"))
    server = None
    try:
        server = servers.start(spec)
        values = scenario.run(server, sizes, logs)
        if server.proc.poll() is not None:
            raise ScenarioError(f"server exited with status {server.proc.returncode}")
        return values
    except (ServerStartError, LoadProcessError, OSError, ValueError) as error:
        detail = f"{type(error).__name__}: {error}"
        if server is not None and server.proc.poll() is not None:
            detail += f" (server exited with status {server.proc.returncode})"
        if server is not None:
            tail = server.log_tail(600).strip()
            if tail:
                detail += f"; server log ends: {tail!r}"
        raise ScenarioError(detail) from error
    finally:
        if server is not None:
            server.stop()
            server.remove_workdir()
        shutil.rmtree(logs, ignore_errors=True)


def show(value: float) -> str:
    return report.number(value)


def make_certificates() -> RunCertificates | str:
    """The TLS column's certificates, or why it cannot run."""
    if not servers.jobserver_has_tls():
        return "this jobserver has no --tls-cert option"
    try:
        return RunCertificates(servers.HOST)
    except CertificatesUnavailable as error:
        return str(error)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    postgres: BenchPostgres | str | None = None
    certificates = make_certificates() if args.tls else None
    try:
        if args.postgresql:
            try:
                postgres = BenchPostgres()
            except PostgresUnavailable as error:
                postgres = f"no PostgreSQL cluster: {error}"
        return run(args, argv, postgres, certificates)
    finally:
        if isinstance(postgres, BenchPostgres):
            postgres.stop()
        if isinstance(certificates, RunCertificates):
            certificates.remove()


def measure_takeovers(
    postgres: BenchPostgres, args: argparse.Namespace, sizes: Sizes, errors: list[str]
) -> list[dict[str, float]]:
    figures = []
    for index, lease in enumerate(args.leases):
        where = f"takeover (lease {lease:g} s)"
        logs = Path(tempfile.mkdtemp(prefix="bench-load-takeover-"))
        try:
            result = takeover.measure(
                postgres, f"takeover_{index}", lease, args.takeover_jobs, sizes.payload, logs
            )
        except Exception as error:
            errors.append(f"{where}: {error}")
            print(f"bench: {where}: ERROR {error}", flush=True)
            continue
        finally:
            shutil.rmtree(logs, ignore_errors=True)
        figures.append(result)
        shown = ", ".join(f"{k}={show(v)}" for k, v in result.items())
        print(f"bench: {where}: {shown}", flush=True)
    return figures


def run(
    args: argparse.Namespace,
    argv: list[str] | None,
    postgres: BenchPostgres | str | None,
    certificates: RunCertificates | str | None = None,
) -> int:
    sizes = QUICK if args.quick else FULL
    if args.idle_connections is not None:
        sizes = dataclasses.replace(sizes, idle_connections=args.idle_connections)
    out = args.out or DEFAULT_OUT
    fd_limit = sizes.idle_connections + 1024
    raise_fd_limit(fd_limit)
    started_at = time.strftime("%Y-%m-%d %H:%M %Z")
    began = time.monotonic()

    lineup, skipped, gear_version = server_lineup(args, sizes, fd_limit, postgres, certificates)
    names = [spec.name for spec in lineup]
    scenarios = [s for s in SCENARIOS if s.key in args.scenarios]
    facts = report.machine_facts(servers.gearmand_version(), gear_version, servers.REPO_ROOT)
    postgres_version = postgres.version if isinstance(postgres, BenchPostgres) else ""
    if postgres_version:
        facts["PostgreSQL"] = f"{postgres_version}, on this machine (shares its cores)"
    print("bench: " + "; ".join(f"{k}: {v}" for k, v in facts.items()), flush=True)
    for name, reason in skipped.items():
        print(f"bench: {name} not run: {reason}", flush=True)

    figures: dict[str, dict[str, list[float]]] = {name: {} for name in names}
    errors: list[str] = []
    for round_index in range(args.rounds if lineup and scenarios else 0):
        shift = round_index % len(lineup)
        order = lineup[shift:] + lineup[:shift]
        for scenario in scenarios:
            for spec in order:
                if scenario.key not in spec.scenarios:
                    continue
                where = f"round {round_index + 1} ({scenario.key}) {spec.name}"
                values = report.attempt(where, partial(run_one, spec, scenario, sizes), errors)
                if values is not None:
                    report.collect(figures[spec.name], values)

    takeovers, takeover_text = [], None
    if isinstance(postgres, BenchPostgres):
        takeovers = measure_takeovers(postgres, args, sizes, errors)
    if takeovers:
        takeover_text = (
            takeover.describe(args.takeover_jobs)
            + "\n\n"
            + report.takeover_table(takeovers, takeover.TARGET_MARGIN_S)
        )

    scaling_figures: scaling.Figures = {}
    scaling_text = None
    if args.scaling:
        wanted = set(args.servers.split(",")) if args.servers else None
        setups, scaling_skipped = scaling.lineup(args.processes, fd_limit, sizes.payload, wanted)
        for name, reason in scaling_skipped.items():
            print(f"bench: scaling: {name} not run: {reason}", flush=True)
        scaling_sizes = scaling.sizes_for(sizes, args.quick)
        scaling_figures = scaling.measure(setups, scaling_sizes, args.rounds, errors)
        scaling_text = "\n\n".join(
            [
                scaling.describe(scaling_sizes, setups),
                *[f"- **{name}**: not run — {reason}" for name, reason in scaling_skipped.items()],
                scaling.table(scaling_figures, setups),
            ]
        )

    probe_notes = {
        spec.name: "GET_STATUS round trips: gear ignores ECHO_REQ"
        for spec in lineup
        if not spec.answers_echo
    }
    rows = report.summarize(figures, names, probe_notes)
    described = describe(sizes)
    command = "python -m bench.run " + shlex.join(argv if argv is not None else sys.argv[1:])
    generated = report.markdown(
        command=command.strip(),
        facts=facts,
        setup=setup_notes(lineup, args, postgres_version) if scenarios else {},
        scenarios={s.key: described[s.key] for s in scenarios},
        rows=rows,
        rounds=args.rounds,
        skipped=skipped if scenarios else {},
        errors=errors,
        started=started_at,
        minutes=(time.monotonic() - began) / 60,
        stores=report.store_table(figures),
        takeover=takeover_text,
        tls=report.tls_table(figures),
        scaling=scaling_text,
    )
    print()
    print(generated)
    report.write_results(out, generated)
    print(f"bench: wrote {out}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "facts": facts,
                    "sizes": dataclasses.asdict(sizes),
                    "rounds": args.rounds,
                    "servers": names,
                    "skipped": skipped,
                    "scenarios": [s.key for s in scenarios],
                    "metrics": {m.key: m.scenario for m in METRICS},
                    "figures": figures,
                    "takeovers": takeovers,
                    "scaling": scaling_figures,
                    "errors": errors,
                },
                indent=1,
            )
        )
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
