"""Scaling by processes (issue 16): N servers of one kind side by side on this machine, the load
spread over them, throughput summed.

    python -m bench.run --scaling --out /tmp/scaling.md [--scaling-processes 1,2,4]

Not part of the default run. For every setup — jobserver (memory store) as 1, 2 and 4
processes, each on its own free port; gearmand as one process with `--threads=1` and with
`--threads=2`, and as 2 and 4 processes of `--threads=1`; and once the canned server, the load
generator's own ceiling — two shapes are measured on freshly started servers:

- foreground jobs (the (d) shape, scenarios.foreground_spread): client process i submits to
  server i mod N; every worker process holds a connection to each of the N servers and takes
  jobs from all of them, as the worker SDK does;
- background submits (the (b) shape, scenarios.submit_spread): connection i to server i mod N.

The load processes are the same in number for every N (so the load generator costs the same),
and they run on the same 2 cores as the servers: the CPU each side used is reported with the
rates, since on this machine the servers can only gain what the load leaves them.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import statistics
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from . import report, servers
from .loadproc import LoadProcessError
from .scenarios import ScenarioError, Sizes, foreground_spread, submit_spread
from .servers import RunningServer, ServerSpec, ServerStartError

PROCESSES = (1, 2, 4)
"""Server processes per setup: one per core of this 2-core machine, and twice that."""

GEARMAND_THREADS = (1, 2)
"""gearmand's --threads for one process: 1 is what the main table runs (servers.GEARMAND_THREADS
says why); 2 gives it an I/O thread per core, its own way of using more cores."""

FG_PER_CLIENT = 100_000
SUBMIT_PER_CONNECTION = 400_000
"""Large enough that no setup finishes before the 5 s cap (Sizes.measure_s): the fastest
figures seen on this machine are about 20k foreground jobs/s and 120k submits/s per process
((d) and (b) of the main table), and 4 x 400,000 in 5 s would be 320k submits/s, near the
load generator's ceiling. A run that ended by count would end with one client still at work
while the other servers sit idle, which a total rate would count against the setup."""

CEILING = report.CEILING
GEARMAND_FAMILY = "gearmand"


@dataclass(frozen=True)
class Setup:
    """One row group: `processes` servers of `spec`. `family` names the setups a ratio is
    taken within; its first setup in the lineup (one process) is the 1.00x."""

    name: str
    family: str
    spec: ServerSpec
    processes: int

    @property
    def label(self) -> str:
        return f"{self.name} x{self.processes}"


@dataclass(frozen=True)
class Shape:
    key: str
    title: str
    rate: str
    """The figure's key in what `run` returns; its CPU figures share the prefix before _rps."""
    run: Callable[[list[RunningServer], Sizes, Path], dict[str, float]]


SHAPES = [
    Shape("d", "foreground jobs/s (SUBMIT_JOB to WORK_COMPLETE)", "fg_rps", foreground_spread),
    Shape("b", "background submits/s (JOB_CREATED), pipelined", "submit_rps", submit_spread),
]


def sizes_for(sizes: Sizes, quick: bool) -> Sizes:
    """The main run's sizes, with counts that the 5 s cap always cuts (unless --quick)."""
    if quick:
        return sizes
    return dataclasses.replace(
        sizes, fg_per_client=FG_PER_CLIENT, submit_per_connection=SUBMIT_PER_CONNECTION
    )


def lineup(
    processes: list[int], fd_limit: int, payload: int, wanted: set[str] | None
) -> tuple[list[Setup], dict[str, str]]:
    """The setups to run, and those left out with the reason. `wanted`: server names
    (ceiling, jobserver-memory, gearmand) from --servers, or None for all."""
    memory = servers.jobserver_specs()[0]  # jobserver-memory (plain `jobserver` before --store)
    setups = [Setup(CEILING, CEILING, servers.canned_spec(payload), 1)]
    setups += [Setup(memory.name, memory.name, memory, n) for n in processes]
    skipped = {}
    if shutil.which(servers.GEARMAND) is None:
        skipped[GEARMAND_FAMILY] = f"{servers.GEARMAND} is not installed"
    else:
        for threads in GEARMAND_THREADS:
            spec = servers.gearmand_spec(threads, fd_limit)
            name = f"gearmand --threads={threads}"
            counts = processes if threads == GEARMAND_THREADS[0] else [1]
            setups += [Setup(name, GEARMAND_FAMILY, spec, n) for n in counts if n in processes]
    if wanted is not None:
        setups = [s for s in setups if s.family in wanted]
    return setups, skipped


def run_setup(setup: Setup, shape: Shape, sizes: Sizes) -> dict[str, float]:
    """Start the setup's servers, run the shape over them, stop them. Adds the CPU the servers
    and the load used, in cores (CPU seconds per second of the run), and the servers' mean RSS
    at start and at the end. Raises ScenarioError with the reason."""
    logs = Path(tempfile.mkdtemp(prefix=f"bench-load-scaling-{setup.name.split()[0]}-"))
    group: list[RunningServer] = []
    try:
        group = servers.start_many(setup.spec, setup.processes)
        rss_start = statistics.mean(s.rss_bytes() for s in group)
        values = shape.run(group, sizes, logs)
        dead = [s for s in group if s.proc.poll() is not None]
        if dead:
            raise ScenarioError(f"server exited with status {dead[0].proc.returncode}")
        prefix = shape.rate.removesuffix("_rps")
        rate = values[shape.rate]
        for side in ("server", "load"):
            cpu_us = values.get(f"{prefix}_{side}_cpu_us")
            if cpu_us is not None:
                values[f"{side}_cores"] = cpu_us * rate / 1e6
        values["rss_start_mib"] = rss_start / 2**20
        values["rss_end_mib"] = statistics.mean(s.rss_bytes() for s in group) / 2**20
        return values
    except (ServerStartError, LoadProcessError, OSError, ValueError) as error:
        detail = f"{type(error).__name__}: {error}"
        for server in group:
            if server.proc.poll() is not None:
                detail += f"; port {server.port} exited with status {server.proc.returncode}"
                detail += f", log ends: {server.log_tail(600).strip()!r}"
        raise ScenarioError(detail) from error
    finally:
        for server in group:
            server.stop()
            server.remove_workdir()
        shutil.rmtree(logs, ignore_errors=True)


Figures = dict[str, dict[str, list[float]]]
"""figures[f"{shape key} {setup label}"][figure key]: one value per round that succeeded."""


def measure(setups: list[Setup], sizes: Sizes, rounds: int, errors: list[str]) -> Figures:
    """Every shape on every setup, `rounds` times; within a round the setups alternate and
    their order rotates from round to round, as in the main run."""
    figures: Figures = {}
    for round_index in range(rounds if setups else 0):
        shift = round_index % len(setups)
        order = setups[shift:] + setups[:shift]
        for shape in SHAPES:
            for setup in order:
                where = f"scaling round {round_index + 1} ({shape.key}) {setup.label}"
                values = report.attempt(where, partial(run_setup, setup, shape, sizes), errors)
                if values is not None:
                    report.collect(figures.setdefault(f"{shape.key} {setup.label}", {}), values)
    return figures


def describe(sizes: Sizes, setups: list[Setup]) -> str:
    s = sizes
    capped = f"stops after {s.measure_s:g} s"
    return "\n".join(
        [
            "Setups: " + ", ".join(setup.label for setup in setups) + ". Each figure comes "
            "from freshly started servers, each on its own 127.0.0.1 port; setups alternate "
            "within a round.",
            "",
            f"- (d) shape: {s.fg_clients} client processes x {s.fg_per_client:,} SUBMIT_JOB of "
            f"{s.payload} B, {s.fg_window} outstanding each, client i on server i mod N; "
            f"{s.fg_workers} worker processes, each with a connection to every server (each "
            f"connection grabs on its own) echoing the payload; {capped}",
            f"- (b) shape: {s.connections} connections (one process each) x "
            f"{s.submit_per_connection:,} SUBMIT_JOB_BG of {s.payload} B, {s.submit_window} in "
            f"flight each, connection i on server i mod N; {capped}",
            "- servers' CPU and load CPU: CPU seconds per second of the run (1.00 = one core "
            "busy), all server processes together and all load processes together; both share "
            f"this machine's {os.cpu_count()} cores. Servers' CPU µs/job: all server processes' "
            "CPU over the run divided by the jobs done",
            "- RSS: mean VmRSS of one server process right after its start, and at the end of "
            "the (d) run",
        ]
    )


def table(figures: Figures, setups: list[Setup]) -> str:
    """Median (min-max) per shape and setup, the ratio to the family's one-process setup, the
    CPU used by each side, and the load-generator flag of the main table."""
    lines = [
        "| shape | server | processes | median /s | min-max | x 1 process | servers' CPU, cores "
        "| servers' CPU µs/job | load CPU, cores | p50 / p99 ms "
        "| RSS per process, MiB: start / end | note |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for shape in SHAPES:
        baselines: dict[str, float] = {}
        ceiling = next(
            (_median(figures, shape, s, shape.rate) for s in setups if s.family == CEILING), None
        )
        first = True
        for setup in setups:
            values = figures.get(f"{shape.key} {setup.label}", {})
            rates = values.get(shape.rate)
            if not rates:
                continue
            median = statistics.median(rates)
            baselines.setdefault(setup.family, median)
            spread = (
                f"{report.number(min(rates))}-{report.number(max(rates))}"
                if len(rates) > 1
                else "(1 round)"
            )
            ratio = "" if setup.family == CEILING else f"{median / baselines[setup.family]:.2f}x"
            latency = ""
            if "fg_p50_ms" in values:
                latency = (
                    f"{report.number(statistics.median(values['fg_p50_ms']))} / "
                    f"{report.number(statistics.median(values['fg_p99_ms']))}"
                )
            rss = ""
            if shape.key == "d" and setup.family != CEILING:
                rss = (
                    f"{statistics.median(values['rss_start_mib']):.0f} / "
                    f"{statistics.median(values['rss_end_mib']):.0f}"
                )
            note = ""
            if setup.family == CEILING:
                note = "load generator's own ceiling (1 canned server)"
            elif ceiling and median >= report.LOAD_BOUND_FRACTION * ceiling:
                note = (
                    f"**load-generator bound** (≥ {report.LOAD_BOUND_FRACTION:.0%} of the ceiling)"
                )
            lines.append(
                f"| {f'({shape.key}) {shape.title} ↑' if first else ''} | {setup.name} "
                f"| {setup.processes} | {report.number(median)} | {spread} | {ratio} "
                f"| {_cores_cell(values, 'server_cores')} "
                f"| {_median_cell(values, shape.rate.removesuffix('_rps') + '_server_cpu_us')} "
                f"| {_cores_cell(values, 'load_cores')} "
                f"| {latency} | {rss} | {note} |"
            )
            first = False
    return "\n".join(lines)


def _median(figures: Figures, shape: Shape, setup: Setup, key: str) -> float | None:
    values = figures.get(f"{shape.key} {setup.label}", {}).get(key)
    return statistics.median(values) if values else None


def _median_cell(values: dict[str, list[float]], key: str) -> str:
    return report.number(statistics.median(values[key])) if values.get(key) else ""


def _cores_cell(values: dict[str, list[float]], key: str) -> str:
    return f"{statistics.median(values[key]):.2f}" if values.get(key) else ""
