"""Smoke run of the benchmark harness (bench/), so that it cannot rot.

`python -m bench.run --quick` runs every scenario against every server with tiny sizes and one
round. This is not a timed test: it asserts only that the run completes, that every scenario
has a figure for every server, and that no run failed. The figures themselves are not checked.
Two opt-in columns get a quick run of their own: the PostgreSQL store (`--postgresql`) and
TLS (jobserver-tls, issue 15); so does the opt-in scaling measurement (`--scaling`, issue 16).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import servers

sys.path.insert(0, str(servers.REPO_ROOT))

from bench.report import CEILING
from bench.scenarios import METRICS, SCENARIOS
from bench.servers import FLOOR, RATE_SCENARIOS, jobserver_has_store

RUN_TIMEOUT = 600  # seconds; a safety bound on a hung run, not a performance expectation


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> tuple[dict, str]:
    servers_missing = servers.missing_gearman_binaries()
    if servers_missing:
        pytest.skip(f"needs gearmand: missing {', '.join(servers_missing)}")
    return run_quick_bench(tmp_path_factory.mktemp("bench"))


def run_quick_bench(out_dir, *options: str) -> tuple[dict, str]:
    """`python -m bench.run --quick *options`; its JSON results and its markdown."""
    results_md, results_json = out_dir / "RESULTS.md", out_dir / "results.json"
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.run",
            "--quick",
            *options,
            "--out",
            str(results_md),
            "--json",
            str(results_json),
        ],
        cwd=servers.REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
    )
    output = f"stdout:\n{completed.stdout[-6000:]}\nstderr:\n{completed.stderr[-3000:]}"
    assert completed.returncode == 0, output
    return json.loads(results_json.read_text()), results_md.read_text()


def expected_servers(skipped: dict[str, str]) -> list[str]:
    if jobserver_has_store():
        jobservers = ["jobserver-memory", "jobserver-sqlite"]
    else:
        jobservers = ["jobserver"]  # before the durable-store issue: memory only, no --store
    names = [CEILING, *jobservers, "gearmand", "geard"]
    if "geard" in skipped:
        # gear may be missing only when pip could not fetch it; anything else is a bug.
        assert "pip could not install it" in skipped["geard"], skipped["geard"]
        names.remove("geard")
    return names


def test_quick_bench_runs_without_errors(quick_run):
    results, _ = quick_run
    assert results["errors"] == []
    assert results["scenarios"] == [scenario.key for scenario in SCENARIOS]


def test_quick_bench_has_a_figure_for_every_scenario_and_server(quick_run):
    results, _ = quick_run
    names = expected_servers(results["skipped"])
    assert results["servers"] == names
    for name in names:
        for metric in METRICS:
            if name == CEILING and metric.scenario not in RATE_SCENARIOS:
                continue
            assert len(results["figures"][name].get(metric.key, [])) == 1, (name, metric.key)


def test_quick_bench_writes_the_table_with_every_server_and_the_machine(quick_run):
    results, markdown = quick_run
    table_rows = [line for line in markdown.splitlines() if line.startswith("| (")]
    assert len(table_rows) == len(METRICS)
    for name in expected_servers(results["skipped"]):
        assert f"| {name} |" in markdown
    for fact in ("CPU", "cores", "kernel", "Python", "gearmand", "gear", "jobserver commit"):
        assert f"- {fact}: " in markdown


@pytest.fixture(scope="module")
def quick_postgresql_run(tmp_path_factory) -> tuple[dict, str]:
    """The PostgreSQL store's part of the bench (`--postgresql`): submits and drain beside the
    memory store, and one takeover, on a private PostgreSQL the run starts itself."""
    return run_quick_bench(
        tmp_path_factory.mktemp("bench-postgresql"),
        "--postgresql",
        "--scenarios",
        "bc",
        "--servers",
        "jobserver-memory,jobserver-postgresql",
        "--takeover-leases",
        "1",
    )


def test_quick_postgresql_bench_measures_submits_drain_and_a_takeover(quick_postgresql_run):
    results, markdown = quick_postgresql_run
    assert results["errors"] == []
    assert results["servers"] == ["jobserver-memory", "jobserver-postgresql"]
    figures = results["figures"]["jobserver-postgresql"]
    assert len(figures["submit_rps"]) == 1 and len(figures["drain_rps"]) == 1
    assert figures["submit_commits"][0] > 0
    (takeover,) = results["takeovers"]
    assert takeover["lost"] == 0 and takeover["run"] == 100
    assert "### Durable stores against the memory store" in markdown
    assert "### Takeover (PostgreSQL store)" in markdown


@pytest.fixture(scope="module")
def quick_tls_run(tmp_path_factory) -> tuple[dict, str]:
    """The TLS column (issue 15) beside plaintext: ECHO, submits and foreground jobs, with
    certificates the run makes (trustme) and every load process speaking mutual TLS."""
    pytest.importorskip("trustme")
    return run_quick_bench(
        tmp_path_factory.mktemp("bench-tls"),
        "--scenarios",
        "abd",
        "--servers",
        "jobserver-memory,jobserver-tls",
    )


def test_quick_tls_bench_compares_tls_with_plaintext(quick_tls_run):
    results, markdown = quick_tls_run
    assert results["errors"] == []
    assert results["servers"] == ["jobserver-memory", "jobserver-tls"]
    figures = results["figures"]["jobserver-tls"]
    for key in ("echo_rps", "submit_rps", "fg_rps", "fg_server_cpu_us", "fg_load_cpu_us"):
        assert len(figures[key]) == 1, key
    assert "### TLS against plaintext (issue 15)" in markdown
    assert "target ≥ 0.6x plaintext" in markdown


@pytest.fixture(scope="module")
def quick_scaling_run(tmp_path_factory) -> tuple[dict, str]:
    """Scaling by processes (issue 16), at its smallest: jobserver as 1 and 2 processes, the
    clients spread over them and every worker connected to both."""
    return run_quick_bench(
        tmp_path_factory.mktemp("bench-scaling"),
        "--scaling",
        "--scaling-processes",
        "1,2",
        "--servers",
        "jobserver-memory",
    )


def test_quick_scaling_bench_measures_each_process_count_and_no_scenario(quick_scaling_run):
    results, markdown = quick_scaling_run
    assert results["errors"] == []
    assert results["scenarios"] == []  # --scaling alone runs none of (a)-(f)
    for shape, rate in (("d", "fg_rps"), ("b", "submit_rps")):
        for processes in (1, 2):
            figures = results["scaling"][f"{shape} jobserver-memory x{processes}"]
            assert len(figures[rate]) == 1, (shape, processes)
            assert len(figures["load_cores"]) == 1, (shape, processes)
    assert "### Scaling by processes (issue 16)" in markdown
    assert "| jobserver-memory | 2 |" in markdown
    assert "### Results" not in markdown


@pytest.fixture(scope="module")
def quick_floor_run(tmp_path_factory) -> tuple[dict, str]:
    """The trio floor (issue 16) beside jobserver: every scenario asked for, so the run must
    keep the floor to the rate scenarios."""
    return run_quick_bench(
        tmp_path_factory.mktemp("bench-floor"),
        "--floor",
        "--servers",
        "trio-floor,jobserver-memory,jobserver-wait-0ms",
    )


def test_quick_floor_bench_runs_each_floor_in_its_scenarios_only(quick_floor_run):
    """trio-floor runs (a)-(d) and no other; its (c) drained every queued job (the scenario
    checks the count) and its (d) jobs went through the workers (clients' results counted
    against the workers' jobs). The waiting store runs (b) only, and its submits were all
    acknowledged (the scenario counts JOB_CREATED)."""
    results, markdown = quick_floor_run
    assert results["errors"] == []
    assert results["servers"] == [FLOOR, "jobserver-memory", "jobserver-wait-0ms"]
    for server, scenarios in ((FLOOR, RATE_SCENARIOS), ("jobserver-wait-0ms", "b")):
        figures = results["figures"][server]
        for metric in METRICS:
            expected = 1 if metric.scenario in scenarios else 0
            assert len(figures.get(metric.key, [])) == expected, (server, metric.key)
    assert f"| {FLOOR} |" in markdown
    assert "Python and trio alone" in markdown
    assert "floor: its store's commit only waits 0 ms" in markdown  # the durable table


def test_the_engine_floor_runs_a_job_through_the_engine():
    """bench/engine_floor.py's jobs really go through (it checks each JOB_ASSIGN_UNIQ, and that
    no job is left unfinished) and it reports a per-job figure."""
    from bench.engine_floor import measure

    assert measure(jobs=200, payload_size=10) > 0
