// The status page: fetches /api/status every REFRESH_MS and redraws the tables in place.
// Everything shown comes from clients (function names, unique ids, error texts), so it is
// only ever put into the page as text (textContent), never as HTML.
"use strict";

(function () {
  const REFRESH_MS = 2000;
  const STALE_AFTER_MS = 3 * REFRESH_MS;
  let lastUpdate = 0;

  function byId(id) {
    return document.getElementById(id);
  }

  function number(value) {
    if (value === null || value === undefined) return "–";
    return Number(value).toLocaleString("en-US", { maximumFractionDigits: 1 });
  }

  function duration(seconds) {
    if (seconds === null || seconds === undefined) return "–";
    if (seconds < 1) return Math.round(seconds * 1000) + " ms";
    if (seconds < 60) return seconds.toFixed(1) + " s";
    const minutes = Math.floor(seconds / 60);
    if (minutes < 60) return minutes + " m " + Math.floor(seconds % 60) + " s";
    const hours = Math.floor(minutes / 60);
    if (hours < 48) return hours + " h " + (minutes % 60) + " m";
    return Math.floor(hours / 24) + " d " + (hours % 24) + " h";
  }

  function clock(unixSeconds) {
    return new Date(unixSeconds * 1000).toLocaleString();
  }

  // A table cell: text, its column name (shown on phones), classes, and a data-field name.
  function cell(text, label, classes, field) {
    const td = document.createElement("td");
    td.textContent = text;
    td.dataset.label = label;
    if (field) td.dataset.field = field;
    for (const name of classes || []) if (name) td.classList.add(name);
    return td;
  }

  function countCell(value, label, field, badWhenPositive) {
    const classes = ["num"];
    if (!value) classes.push("zero");
    else if (badWhenPositive) classes.push("bad");
    return cell(number(value), label, classes, field);
  }

  function ageClass(seconds) {
    if (seconds === null || seconds === undefined) return "zero";
    if (seconds >= 300) return "bad";
    if (seconds >= 60) return "warn";
    return "";
  }

  function fill(tableId, rows, makeRow, emptyId) {
    const body = byId(tableId).tBodies[0];
    body.replaceChildren(...rows.map(makeRow));
    byId(tableId).hidden = rows.length === 0;
    byId(emptyId).hidden = rows.length !== 0;
  }

  function shownOf(shown, total) {
    return shown < total ? "(" + number(shown) + " of " + number(total) + ")" : "(" + number(total) + ")";
  }

  function functionRow(fn) {
    const tr = document.createElement("tr");
    tr.dataset.function = fn.name;
    tr.append(
      cell(fn.name, "Function", ["name"], "name"),
      countCell(fn.queued.high, "High", "queued-high"),
      countCell(fn.queued.normal, "Normal", "queued-normal"),
      countCell(fn.queued.low, "Low", "queued-low"),
      countCell(fn.waiting, "Waiting", "waiting"),
      countCell(fn.running, "Running", "running"),
      countCell(fn.workers, "Workers", "workers"),
      cell(duration(fn.oldest_queued_age_seconds), "Oldest queued",
        ["num", ageClass(fn.oldest_queued_age_seconds)], "oldest"),
      cell(number(fn.completed_per_minute), "Done / min", ["num"], "completed-rate"),
      cell(number(fn.failed_per_minute), "Failed / min",
        ["num", fn.failed_per_minute ? "warn" : ""], "failed-rate"),
      countCell(fn.dead, "Dead", "dead", true),
    );
    return tr;
  }

  function workerRow(worker) {
    const tr = document.createElement("tr");
    tr.dataset.worker = String(worker.id);
    let functions = worker.functions.join(", ");
    if (worker.functions_total > worker.functions.length) {
      functions += " … (" + number(worker.functions_total) + ")";
    }
    tr.append(
      cell(String(worker.id), "Id", ["num"], "id"),
      cell(worker.address, "Address", [], "address"),
      cell(worker.client_id, "Client id", ["name"], "client-id"),
      cell(functions, "Functions", ["name"], "functions"),
      countCell(worker.running, "Running", "running"),
    );
    return tr;
  }

  function runningRow(job) {
    const tr = document.createElement("tr");
    tr.append(
      cell(job.handle, "Handle", ["name"], "handle"),
      cell(job.function, "Function", ["name"], "function"),
      cell(job.unique, "Unique", ["name"], "unique"),
      cell(job.worker_address + " (" + job.worker_id + ")", "Worker", [], "worker"),
      cell(duration(job.age_seconds), "Running for", ["num", ageClass(job.age_seconds)], "age"),
    );
    return tr;
  }

  function deadRow(job) {
    const tr = document.createElement("tr");
    tr.append(
      cell(job.handle, "Handle", ["name"], "handle"),
      cell(job.function, "Function", ["name"], "function"),
      cell(job.unique, "Unique", ["name"], "unique"),
      cell(number(job.attempts), "Attempts", ["num"], "attempts"),
      cell(clock(job.last_failure), "Last failure", [], "last-failure"),
      cell(job.error, "Error", ["error"], "error"),
    );
    return tr;
  }

  function draw(status) {
    const server = status.server;
    const totals = status.totals;
    byId("server-name").textContent =
      "port " + server.port + (server.node_id ? " · node " + server.node_id : "");
    byId("facts").textContent = [
      "version " + server.version,
      "pid " + server.pid,
      "up " + duration(server.uptime_seconds),
      "store " + server.store,
      number(server.connections) + " of " + number(server.max_connections) + " connections",
    ].join(" · ");
    byId("total-queued").textContent = number(totals.queued);
    byId("total-running").textContent = number(totals.running);
    byId("total-workers").textContent = number(totals.workers);
    byId("total-completed-rate").textContent = number(totals.completed_per_minute);
    byId("total-failed-rate").textContent = number(totals.failed_per_minute);
    byId("total-dead").textContent = number(totals.dead);

    byId("functions-count").textContent = shownOf(status.functions.length, status.functions_total);
    fill("functions", status.functions, functionRow, "functions-empty");
    byId("workers-count").textContent = shownOf(status.workers.length, totals.workers);
    fill("workers", status.workers, workerRow, "workers-empty");
    byId("running-count").textContent = shownOf(status.running_jobs.length, status.running_total);
    fill("running", status.running_jobs, runningRow, "running-empty");
    byId("dead-count").textContent = shownOf(status.dead_jobs.length, status.dead_total);
    fill("dead", status.dead_jobs, deadRow, "dead-empty");
    document.title = "jobserver · " + number(totals.queued) + " queued · " + number(totals.running) + " running";
  }

  function showState(state, text) {
    const live = byId("live");
    live.dataset.state = state;
    live.textContent = text;
  }

  async function refresh() {
    try {
      const response = await fetch("/api/status", { cache: "no-store" });
      if (!response.ok) throw new Error("HTTP " + response.status);
      draw(await response.json());
      lastUpdate = Date.now();
      showState("live", "live · " + new Date(lastUpdate).toLocaleTimeString());
    } catch (error) {
      if (lastUpdate && Date.now() - lastUpdate < STALE_AFTER_MS) {
        showState("stale", "retrying…");
      } else {
        const since = lastUpdate ? " · last update " + new Date(lastUpdate).toLocaleTimeString() : "";
        showState("error", "cannot reach the server" + since);
      }
    } finally {
      setTimeout(refresh, REFRESH_MS);
    }
  }

  refresh();
})();
