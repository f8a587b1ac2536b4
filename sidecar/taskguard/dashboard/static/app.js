// Task Guard dashboard: plain JavaScript, no build step, no library.
//
// The server sends "hello" (every guard, the feed, the connection) when the stream opens, then "batch"
// (changed guards and new events, at most ten a second) and "status" (the sidecar watch went up or down).
// Reading needs the dashboard's viewer token, sent as "Authorization: Bearer ..." on every request: the
// stream is read with fetch() (EventSource cannot send a header, and the token must not go in a URL).
// Until the dashboard accepts a token the page shows only the prompt for one. Before it sends the token to
// the server at all, after every reconnect too, the server must prove that it knows it (GET /proof): a loopback
// port is anyone's while the dashboard is down, and whoever serves it then must get nothing from this page.
// The table is virtualised: only the rows in view (plus a margin) exist in the DOM, and a row's cells are
// written only when their text changed. The feed keeps at most feed_cap entries. All text goes in through
// textContent, never as HTML.
(() => {
  "use strict";

  const OVERSCAN = 12;
  const TOKEN_KEY = "taskguard.operatorToken";
  const VIEWER_KEY = "taskguard.viewerToken";
  const RECONNECT_MS = 1000;
  const NAME_KEY = "taskguard.operatorName";
  const APPROVABLE = new Set(["FAILED", "ABANDONED", "EXPIRED"]);
  const COLUMNS = 10;
  const number = new Intl.NumberFormat("en-US");

  const $ = (id) => document.getElementById(id);
  const grid = $("grid");
  const rowsBody = $("rows");
  const spacerTop = $("spacer-top");
  const spacerBottom = $("spacer-bottom");
  const feedList = $("feed");
  const historyList = $("history");

  const store = {
    guards: new Map(), // task_key -> guard (as sent, plus parsed times)
    keys: [], // every task_key, sorted
    view: [], // the keys that pass the filters, sorted
    staleAfterMs: 120000,
    feedCap: 200,
    historyCap: 50,
    revision: 0,
    selected: null,
    connection: { state: "connecting", message: "", since: null },
    dashboardDown: false,
  };
  const filters = { prefix: "", state: "" };
  const pool = []; // the <tr> elements in use, in display order
  let rowHeight = 28;
  let viewDirty = true;
  let renderQueued = false;
  let history = { key: null, loading: false, newest: 0 };

  // Figures the tests read (and anyone curious, from the console).
  const metrics = {
    helloMs: null, // navigation start -> first hello parsed
    firstRenderMs: null, // navigation start -> first table render with rows
    helloGuards: 0,
    lastFilterMs: null, // filter input -> table rendered
    lastRenderMs: null,
    longestTaskMs: 0,
    batches: 0,
    events: 0,
  };
  window.taskguardDashboard = { metrics, store };
  try {
    new PerformanceObserver((list) => {
      for (const entry of list.getEntries()) metrics.longestTaskMs = Math.max(metrics.longestTaskMs, entry.duration);
    }).observe({ type: "longtask", buffered: true });
  } catch (_) {
    // No long-task timing in this browser: the figure stays 0.
  }

  // --- guards ------------------------------------------------------------------------------

  function parsed(guard) {
    guard.startedMs = guard.started_at ? Date.parse(guard.started_at) : NaN;
    guard.expiresMs = guard.expires_at ? Date.parse(guard.expires_at) : NaN;
    const seen = guard.heartbeat_at ? Date.parse(guard.heartbeat_at) : guard.startedMs;
    guard.seenMs = seen;
    return guard;
  }

  // The sidecar's flag as of the guard's last event, or what time made of it since: a unary lease past its
  // expiry, or one not renewed for stale_after. (Hold-stream heartbeats are not events: for stream-bound runs
  // only the sidecar's flag counts.)
  function isStale(guard, now) {
    if (guard.stale) return true;
    if (guard.state !== "RUNNING") return false;
    if (!Number.isNaN(guard.expiresMs) && now >= guard.expiresMs) return true;
    return !guard.stream_bound && now - guard.seenMs > store.staleAfterMs;
  }

  function passes(guard, now) {
    if (filters.prefix && !guard.task_key.startsWith(filters.prefix)) return false;
    switch (filters.state) {
      case "":
        return true;
      case "attention":
        return guard.awaiting_approval || isStale(guard, now);
      case "awaiting":
        return guard.awaiting_approval;
      case "stale":
        return isStale(guard, now);
      default:
        return guard.state === filters.state;
    }
  }

  function insertKey(key) {
    const keys = store.keys;
    let low = 0;
    let high = keys.length;
    while (low < high) {
      const middle = (low + high) >>> 1;
      if (keys[middle] < key) low = middle + 1;
      else high = middle;
    }
    keys.splice(low, 0, key);
  }

  function putGuard(guard) {
    parsed(guard);
    if (!store.guards.has(guard.task_key)) insertKey(guard.task_key);
    store.guards.set(guard.task_key, guard);
  }

  function recomputeView(now) {
    const view = [];
    let running = 0;
    let awaiting = 0;
    let stale = 0;
    for (const key of store.keys) {
      const guard = store.guards.get(key);
      if (guard.state === "RUNNING") running += 1;
      if (guard.awaiting_approval) awaiting += 1;
      if (isStale(guard, now)) stale += 1;
      if (passes(guard, now)) view.push(key);
    }
    store.view = view;
    viewDirty = false;
    showCounts(store.keys.length, running, awaiting, stale, view.length);
  }

  function showCounts(total, running, awaiting, stale, shown) {
    const counts = $("counts");
    counts.replaceChildren(
      count("c-total", total, total === 1 ? " guard" : " guards"),
      " · ",
      count("c-running", running, " running"),
      " · ",
      count("c-awaiting", awaiting, " awaiting approval"),
      " · ",
      count("c-stale", stale, " stale"),
    );
    const label = $("shown");
    label.dataset.shown = String(shown);
    label.dataset.total = String(total);
    label.textContent = shown === total ? `showing all ${number.format(total)}` : `showing ${number.format(shown)} of ${number.format(total)}`;
  }

  function count(className, value, text) {
    const span = document.createElement("span");
    span.className = className;
    span.dataset.count = String(value);
    const bold = document.createElement("b");
    bold.textContent = number.format(value);
    span.append(bold, text);
    return span;
  }

  // --- rendering ---------------------------------------------------------------------------

  function scheduleRender() {
    if (renderQueued) return;
    renderQueued = true;
    requestAnimationFrame(() => {
      renderQueued = false;
      render();
    });
  }

  function newRow() {
    const row = document.createElement("tr");
    row.className = "row";
    for (let i = 0; i < COLUMNS; i += 1) row.append(document.createElement("td"));
    row.cells[2].className = "state";
    row.cells[8].className = "num";
    row.cells[9].className = "num";
    row._text = new Array(COLUMNS).fill(null);
    row._title = new Array(COLUMNS).fill(null);
    return row;
  }

  function render() {
    const started = performance.now();
    const now = Date.now();
    if (viewDirty) recomputeView(now);
    const view = store.view;
    const head = grid.querySelector("thead").offsetHeight;
    const first = Math.max(0, Math.floor(grid.scrollTop / rowHeight) - OVERSCAN);
    const wanted = Math.ceil(Math.max(grid.clientHeight - head, rowHeight) / rowHeight) + 1 + 2 * OVERSCAN;
    const shown = Math.max(0, Math.min(view.length - first, wanted));
    while (pool.length < shown) {
      const row = newRow();
      rowsBody.insertBefore(row, spacerBottom);
      pool.push(row);
    }
    while (pool.length > shown) pool.pop().remove();
    for (let i = 0; i < shown; i += 1) fillRow(pool[i], store.guards.get(view[first + i]), now);
    setSpacer(spacerTop, first * rowHeight);
    setSpacer(spacerBottom, (view.length - first - shown) * rowHeight);
    $("empty").hidden = view.length > 0;
    if (pool.length > 0 && metrics.firstRenderMs === null) {
      rowHeight = pool[0].getBoundingClientRect().height || rowHeight;
      metrics.firstRenderMs = Math.round(performance.now());
    }
    metrics.lastRenderMs = performance.now() - started;
  }

  function setSpacer(row, height) {
    const text = `${height}px`;
    if (row._height === text) return;
    row._height = text;
    row.style.display = height > 0 ? "" : "none";
    row.firstElementChild.style.height = text;
  }

  function setCell(row, index, text, title) {
    if (row._text[index] !== text) {
      row.cells[index].textContent = text;
      row._text[index] = text;
    }
    const tip = title === undefined ? text : title;
    if (row._title[index] !== tip) {
      row.cells[index].title = tip;
      row._title[index] = tip;
    }
  }

  function fillRow(row, guard, now) {
    if (row.dataset.taskKey !== guard.task_key) row.dataset.taskKey = guard.task_key;
    const stale = isStale(guard, now);
    const classes = `row${guard.awaiting_approval ? " awaiting" : ""}${stale ? " stale" : ""}${
      store.selected === guard.task_key ? " selected" : ""}`;
    if (row.className !== classes) row.className = classes;
    if (row.dataset.state !== guard.state) row.dataset.state = guard.state;
    setCell(row, 0, guard.session_key || "-");
    setCell(row, 1, guard.task_name);
    setState(row, guard, stale);
    setCell(row, 3, guard.run_id);
    setCell(row, 4, guard.holder || "-");
    setCell(row, 5, clock(guard.startedMs, now), guard.started_at || "");
    setCell(row, 6, Number.isNaN(guard.startedMs) ? "-" : span(now - guard.startedMs));
    setCell(row, 7, expires(guard, now), guard.expires_at || "no TTL");
    setCell(row, 8, String(guard.fencing_token));
    setCell(row, 9, String(guard.duplicate_count));
    const some = guard.duplicate_count > 0 ? "num dups-some" : "num";
    if (row.cells[9].className !== some) row.cells[9].className = some;
  }

  function setState(row, guard, stale) {
    const mark = `${guard.state}|${guard.awaiting_approval}|${stale}`;
    if (row._text[2] === mark) return;
    row._text[2] = mark;
    const cell = row.cells[2];
    cell.className = `state s-${guard.state}`;
    const parts = [guard.state];
    if (guard.awaiting_approval) parts.push(tag("tag-awaiting", "awaiting approval"));
    if (stale) parts.push(tag("tag-stale", "stale"));
    cell.replaceChildren(...parts);
    cell.title = `${guard.state}${guard.awaiting_approval ? ", awaiting approval" : ""}${stale ? ", stale" : ""}`;
  }

  function tag(className, text) {
    const span = document.createElement("span");
    span.className = `tag ${className}`;
    span.textContent = text;
    return span;
  }

  function span(ms) {
    let total = Math.floor(Math.abs(ms) / 1000);
    const days = Math.floor(total / 86400);
    total -= days * 86400;
    const hours = Math.floor(total / 3600);
    total -= hours * 3600;
    const minutes = Math.floor(total / 60);
    const seconds = total - minutes * 60;
    if (days) return `${days}d${hours}h`;
    if (hours) return `${hours}h${minutes}m`;
    if (minutes) return `${minutes}m${seconds}s`;
    return `${seconds}s`;
  }

  function pad(value) {
    return String(value).padStart(2, "0");
  }

  function clock(ms, now) {
    if (Number.isNaN(ms)) return "-";
    const at = new Date(ms);
    const time = `${pad(at.getHours())}:${pad(at.getMinutes())}:${pad(at.getSeconds())}`;
    if (Math.abs(now - ms) < 20 * 3600 * 1000) return time;
    return `${pad(at.getMonth() + 1)}-${pad(at.getDate())} ${time.slice(0, 5)}`;
  }

  function expires(guard, now) {
    if (guard.state !== "RUNNING" || Number.isNaN(guard.expiresMs)) return "-";
    const left = guard.expiresMs - now;
    return left >= 0 ? `in ${span(left)}` : `${span(left)} ago`;
  }

  // --- events: the feed and one guard's history --------------------------------------------

  const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;

  // A run id short enough to read in a line: a UUID's first 8 digits, like a short commit hash.
  function shortId(id) {
    if (UUID.test(id)) return `${id.slice(0, 8)}…`;
    return id.length > 28 ? `${id.slice(0, 24)}…` : id;
  }

  function describe(event, short = shortId) {
    const run = (id, holder) => `run ${short(id)}${holder ? ` (${holder})` : ""}`;
    switch (event.type) {
      case "ACQUIRED":
        return `${run(event.run_id, event.holder)} acquired, token ${event.fencing_token}`;
      case "DUPLICATE_REFUSED":
        return `refused ${run(event.trigger_run_id, event.trigger_holder)}; winner ${run(event.run_id, event.holder)}; ${event.duplicate_count} refused`;
      case "RETRY_REFUSED":
        return `refused ${run(event.trigger_run_id, event.trigger_holder)}: run ${short(event.run_id)} ended ${event.state}, a retry needs approval`;
      case "RELEASED":
        return `run ${short(event.run_id)} ${event.state}${event.detail ? `: ${event.detail}` : ""}`;
      case "EXPIRED":
      case "ABANDONED":
        return `${run(event.run_id, event.holder)}${event.detail ? `: ${event.detail}` : ""}`;
      case "RETRY_APPROVED":
        return `run ${short(event.run_id)} may be retried once; by ${event.actor || "-"}${event.reason ? `: ${event.reason}` : ""}`;
      case "FORCE_RELEASED":
        return `run ${short(event.run_id)} ${event.state} by ${event.actor || "-"}${event.reason ? `: ${event.reason}` : ""}`;
      case "RENEWED":
        return `run ${short(event.run_id)} renewed`;
      case "RESUMED":
        return `run ${short(event.run_id)} resumed its lease`;
      default:
        return `run ${short(event.run_id)} ${event.state}`;
    }
  }

  function eventItem(event, withKey) {
    const item = document.createElement("li");
    item.className = `t-${event.type}${event.type === "RELEASED" && event.state === "FAILED" ? " failed" : ""}`;
    item.dataset.revision = String(event.revision);
    item.dataset.type = event.type;
    item.dataset.taskKey = event.task_key;
    item.dataset.runId = event.run_id;
    if (event.trigger_run_id) item.dataset.triggerRunId = event.trigger_run_id;
    const when = document.createElement("span");
    when.className = "when";
    const at = event.occurred_at ? Date.parse(event.occurred_at) : NaN;
    when.textContent = Number.isNaN(at) ? "" : clock(at, Date.now());
    when.title = event.occurred_at || "";
    const rev = document.createElement("span");
    rev.className = "rev";
    rev.textContent = `#${event.revision}`;
    const type = document.createElement("span");
    type.className = "type";
    type.textContent = event.type;
    const parts = [when, " ", rev, " ", type, " "];
    if (withKey) {
      const key = document.createElement("span");
      key.className = "key";
      key.textContent = event.task_key;
      parts.push(key, " ");
    }
    const text = document.createElement("span");
    text.className = "text";
    text.textContent = describe(event);
    text.title = describe(event, (id) => id);
    parts.push(text);
    item.append(...parts);
    return item;
  }

  // Newest first; at most `cap` entries stay in the list.
  function prepend(list, events, cap, withKey) {
    const fragment = document.createDocumentFragment();
    const start = Math.max(0, events.length - cap);
    for (let i = events.length - 1; i >= start; i -= 1) fragment.append(eventItem(events[i], withKey));
    list.prepend(fragment);
    while (list.childElementCount > cap) list.lastElementChild.remove();
  }

  function showHistory(key) {
    history = { key, loading: true, newest: 0 };
    historyList.replaceChildren();
    if (!proven) {
      historyList.replaceChildren(note("not connected to the dashboard"));
      return;
    }
    fetch(`/api/history?task_key=${encodeURIComponent(key)}`, { cache: "no-store", headers: viewerHeaders() })
      .then((response) => {
        if (response.status === 401) {
          refused(SENT_AND_REFUSED);
          throw new Error("the viewer token was refused");
        }
        return response.json();
      })
      .then((body) => {
        if (history.key !== key) return;
        historyList.replaceChildren();
        prepend(historyList, body.events, store.historyCap, false);
        history.loading = false;
        history.newest = body.events.length ? body.events[body.events.length - 1].revision : 0;
        if (!body.events.length) historyList.append(note("no event for this key since the dashboard started"));
      })
      .catch(() => {
        if (history.key === key) historyList.replaceChildren(note("could not load the history"));
      });
  }

  function note(text) {
    const item = document.createElement("li");
    item.className = "note hint";
    item.textContent = text;
    return item;
  }

  function historyEvents(events) {
    if (!history.key || history.loading) return; // the fetch answers with everything up to now
    const fresh = events.filter((event) => event.task_key === history.key && event.revision > history.newest);
    if (!fresh.length) return;
    const placeholder = historyList.querySelector("li.note");
    if (placeholder) placeholder.remove();
    prepend(historyList, fresh, store.historyCap, false);
    history.newest = fresh[fresh.length - 1].revision;
  }

  // --- the selected guard ------------------------------------------------------------------

  function select(key) {
    store.selected = key;
    showDetail();
    showHistory(key);
    scheduleRender();
  }

  function showDetail() {
    const key = store.selected;
    const guard = key ? store.guards.get(key) : null;
    $("detail-key").textContent = key || "";
    $("detail-hint").hidden = Boolean(key);
    const fields = $("detail-fields");
    const rows = [];
    if (guard) {
      const now = Date.now();
      const stale = isStale(guard, now);
      const state = `${guard.state}${guard.awaiting_approval ? " · awaiting approval" : ""}${stale ? " · stale" : ""}`;
      rows.push(
        ["state", state],
        ["run id", guard.run_id],
        ["holder", guard.holder || "-"],
        ["attempt", `${guard.attempt}, fencing token ${guard.fencing_token}`],
        ["refused", `${guard.duplicate_count} duplicate${guard.duplicate_count === 1 ? "" : "s"}`],
        ["started", guard.started_at || "-"],
      );
      if (guard.state === "RUNNING") {
        rows.push(
          ["heartbeat", guard.heartbeat_at || "-"],
          ["expires", guard.expires_at || (guard.stream_bound ? "held by its Hold stream" : "-")],
        );
      }
      if (guard.released_at) rows.push(["released", guard.released_at]);
      if (guard.last_status) rows.push(["last status", guard.last_status]);
      if (guard.last_detail) rows.push(["detail", guard.last_detail]);
      if (guard.approved_by) rows.push(["approved by", `${guard.approved_by}: ${guard.approval_reason || "-"}`]);
      if (guard.released_by) rows.push(["released by", guard.released_by]);
      const labels = Object.entries(guard.labels || {});
      if (labels.length) rows.push(["labels", labels.map(([name, value]) => `${name}=${value}`).join(", ")]);
    }
    const nodes = [];
    for (const [name, value] of rows) {
      const term = document.createElement("dt");
      term.textContent = name;
      const text = document.createElement("dd");
      text.textContent = value;
      nodes.push(term, text);
    }
    fields.replaceChildren(...nodes);
    updateButtons();
  }

  function updateButtons() {
    const guard = store.selected ? store.guards.get(store.selected) : null;
    const token = operatorToken();
    const approve = $("approve");
    const force = $("force");
    approve.disabled = !token || !guard || !(guard.awaiting_approval || APPROVABLE.has(guard.state));
    force.disabled = !token || !guard || guard.state !== "RUNNING";
    const why = !token ? "paste the operator token first" : !guard ? "select a guard first" : "";
    approve.title = why || (approve.disabled ? `a ${guard.state} guard needs no approval` : "let this key be acquired once more");
    force.title = why || (force.disabled ? "only a RUNNING guard can be force-released" : "end the run as CANCELLED");
  }

  // --- actions -----------------------------------------------------------------------------

  function operatorToken() {
    return sessionStorage.getItem(TOKEN_KEY) || "";
  }

  function showToken() {
    const set = Boolean(operatorToken());
    const state = $("token-state");
    state.dataset.set = String(set);
    state.textContent = set ? "operator token set (this tab only)" : "no operator token: actions disabled";
    $("forget-token").hidden = !set;
    $("operator").value = sessionStorage.getItem(NAME_KEY) || "";
    updateButtons();
  }

  function useToken() {
    const input = $("token");
    const token = input.value.trim();
    input.value = "";
    if (token) sessionStorage.setItem(TOKEN_KEY, token);
    const name = $("operator").value.trim();
    if (name) sessionStorage.setItem(NAME_KEY, name);
    else sessionStorage.removeItem(NAME_KEY);
    showToken();
  }

  function forgetToken() {
    sessionStorage.removeItem(TOKEN_KEY);
    showToken();
  }

  const ACTIONS = {
    "approve-retry": { title: "Approve a retry", verb: "approve-retry" },
    "force-release": { title: "Force-release the running run", verb: "force-release" },
  };
  let pending = null;

  function ask(action) {
    const key = store.selected;
    if (!key) return;
    pending = { action, key };
    $("reason-title").textContent = ACTIONS[action].title;
    $("reason-key").textContent = key;
    $("reason").value = "";
    $("reason-ok").disabled = true;
    $("reason-dialog").showModal();
    $("reason").focus();
  }

  function closeDialog() {
    pending = null;
    $("reason-dialog").close();
  }

  async function confirmAction() {
    const reason = $("reason").value.trim();
    if (!pending || !reason) return;
    const { action, key } = pending;
    closeDialog();
    if (!proven) {
      result("error", `${action} ${key}: not connected to the dashboard; nothing was sent`);
      return;
    }
    result("pending", `${action} ${key}…`);
    let body;
    try {
      const response = await fetch(`/api/${action}`, {
        method: "POST",
        cache: "no-store",
        credentials: "same-origin",
        headers: {
          ...viewerHeaders(),
          "Content-Type": "application/json",
          "X-TaskGuard-Dashboard": "1",
          "X-TaskGuard-Operator-Token": operatorToken(),
        },
        body: JSON.stringify({ task_key: key, reason, operator: sessionStorage.getItem(NAME_KEY) || "" }),
      });
      if (response.status === 401) refused(SENT_AND_REFUSED);
      body = await response.json().catch(() => ({ ok: false, code: `HTTP ${response.status}`, error: response.statusText }));
    } catch (error) {
      body = { ok: false, code: "UNREACHABLE", error: `the dashboard did not answer (${error})` };
    }
    if (body.ok) {
      const guard = body.guard;
      const by = guard.approved_by && action === "approve-retry" ? ` by ${guard.approved_by}` : guard.released_by ? ` by ${guard.released_by}` : "";
      const what = action === "approve-retry" ? `run ${guard.run_id} may be retried once` : `run ${guard.run_id} ended`;
      result("ok", `${action} ${key}: ${guard.state}${by} (${what})`);
    } else {
      result("error", `${action} ${key} failed: ${body.code}: ${body.error}`);
    }
  }

  function result(outcome, text) {
    const line = $("action-result");
    line.dataset.outcome = outcome;
    line.textContent = text;
    line.title = text;
  }

  // --- connection --------------------------------------------------------------------------

  function showConnection() {
    const pill = $("connection");
    const banner = $("banner");
    const connection = store.connection;
    if (store.dashboardDown) {
      pill.dataset.state = "dashboard-down";
      pill.textContent = "dashboard unreachable";
      banner.dataset.kind = "dashboard";
      banner.textContent = "Lost the connection to the dashboard server. Showing the last known state; reconnecting by itself.";
      banner.hidden = false;
      return;
    }
    pill.dataset.state = connection.state;
    pill.title = connection.message || "";
    if (connection.state === "up") {
      pill.textContent = "live";
      banner.hidden = true;
      banner.dataset.kind = "";
    } else if (connection.state === "down") {
      pill.textContent = "sidecar unreachable";
      const since = connection.since ? clock(Date.parse(connection.since), Date.now()) : "";
      banner.dataset.kind = "sidecar";
      banner.textContent = `The sidecar is unreachable${since ? ` since ${since}` : ""}: ${connection.message}. ` +
        "Showing the last known state; the dashboard reconnects by itself and catches up.";
      banner.hidden = false;
    } else {
      pill.textContent = "connecting…";
      banner.hidden = true;
    }
  }

  // --- the stream --------------------------------------------------------------------------

  function onHello(message) {
    const hello = JSON.parse(message.data);
    store.staleAfterMs = hello.stale_after_s * 1000;
    store.feedCap = hello.feed_cap;
    store.historyCap = hello.history_cap;
    store.revision = hello.revision;
    store.connection = hello.connection;
    store.dashboardDown = false;
    store.guards = new Map();
    for (const guard of hello.guards) store.guards.set(guard.task_key, parsed(guard));
    store.keys = Array.from(store.guards.keys()).sort();
    viewDirty = true;
    feedList.replaceChildren();
    prepend(feedList, hello.feed, store.feedCap, true);
    if (metrics.helloMs === null) {
      metrics.helloMs = Math.round(performance.now());
      metrics.helloGuards = hello.guards.length;
    }
    showConnection();
    render();
    if (store.selected) {
      showDetail();
      showHistory(store.selected);
    }
  }

  function onBatch(message) {
    const batch = JSON.parse(message.data);
    metrics.batches += 1;
    metrics.events += batch.events.length;
    store.revision = Math.max(store.revision, batch.revision);
    for (const guard of batch.guards) putGuard(guard);
    viewDirty = true; // the counts move with every batch (one pass over the guards, at most ten times a second)
    if (batch.reset_feed) feedList.replaceChildren();
    if (batch.events.length) prepend(feedList, batch.events, store.feedCap, true);
    historyEvents(batch.events);
    if (store.selected && batch.guards.some((guard) => guard.task_key === store.selected)) showDetail();
    if (store.connection.state !== "up" && batch.events.length) {
      // Events flowing is proof enough; the status message says so too, right after.
      store.connection = { ...store.connection, state: "up" };
      showConnection();
    }
    scheduleRender();
  }

  function onStatus(message) {
    store.connection = JSON.parse(message.data);
    showConnection();
  }

  // --- the viewer token ---------------------------------------------------------------------

  function viewerToken() {
    return sessionStorage.getItem(VIEWER_KEY) || "";
  }

  function viewerHeaders() {
    return { Authorization: `Bearer ${viewerToken()}` };
  }

  function lock(why) {
    document.body.dataset.locked = "true";
    $("locked-error").textContent = why;
    $("connection").dataset.state = "locked";
    $("connection").textContent = "locked";
    $("banner").hidden = true;
    $("viewer-token").focus();
  }

  const SENT_AND_REFUSED = "The dashboard refused this viewer token.";
  const NOT_PROVEN =
    "The viewer token was refused: the server at this address does not know it (a wrong or replaced token, or " +
    "not the dashboard at all), so the page sent it nothing.";

  // The token in this tab is not (or no longer) the token of the server at this address.
  function refused(why) {
    sessionStorage.removeItem(VIEWER_KEY);
    proven = false;
    if (stream) stream.abort();
    stream = null;
    lock(why);
  }

  function hex(bytes) {
    return Array.from(bytes, (byte) => byte.toString(16).padStart(2, "0")).join("");
  }

  // Whether the server at this address knows the viewer token: "proven", "refused", or "unreachable".
  async function prove(signal) {
    if (!window.crypto || !crypto.subtle) {
      // No WebCrypto outside a secure context (plain HTTP beyond loopback, --allow-remote): there the token
      // crosses the network in the clear anyway, as the dashboard warns when it starts.
      return "proven";
    }
    const nonce = hex(crypto.getRandomValues(new Uint8Array(16)));
    let answer;
    try {
      const response = await fetch(`/proof?nonce=${nonce}`, { cache: "no-store", signal });
      if (!response.ok) return "refused";
      answer = await response.json();
    } catch (_) {
      return signal.aborted ? "refused" : "unreachable";
    }
    const encoder = new TextEncoder();
    const key = await crypto.subtle.importKey(
      "raw", encoder.encode(viewerToken()), { name: "HMAC", hash: "SHA-256" }, false, ["sign"]);
    const mac = await crypto.subtle.sign("HMAC", key, encoder.encode(`taskguard-dashboard-proof:${nonce}`));
    return answer && answer.proof === hex(new Uint8Array(mac)) ? "proven" : "refused";
  }

  function unlock() {
    const input = $("viewer-token");
    const token = input.value.trim();
    input.value = "";
    if (!token) return;
    sessionStorage.setItem(VIEWER_KEY, token);
    $("locked-error").textContent = "";
    connect();
  }

  // --- the stream --------------------------------------------------------------------------

  const HANDLERS = { hello: onHello, batch: onBatch, status: onStatus };
  let stream = null; // the AbortController of the open stream
  let reconnect = null;
  let proven = false; // the server of the open stream proved it knows the token

  function connect() {
    if (reconnect !== null) clearTimeout(reconnect);
    reconnect = null;
    if (stream) stream.abort();
    if (!viewerToken()) {
      lock("");
      return;
    }
    const controller = new AbortController();
    stream = controller;
    follow(controller).then(() => {
      if (controller.signal.aborted || stream !== controller) return;
      // Like EventSource: the dashboard went away or the stream broke; keep the last state and try again.
      store.dashboardDown = true;
      showConnection();
      reconnect = setTimeout(connect, RECONNECT_MS);
    });
  }

  async function follow(controller) {
    const verdict = await prove(controller.signal);
    if (controller.signal.aborted || verdict === "unreachable") return;
    if (verdict === "refused") {
      refused(NOT_PROVEN);
      return;
    }
    proven = true;
    try {
      await openStream(controller);
    } finally {
      proven = false;
    }
  }

  async function openStream(controller) {
    let response;
    try {
      response = await fetch("/events", {
        cache: "no-store",
        headers: { ...viewerHeaders(), Accept: "text/event-stream" },
        signal: controller.signal,
      });
    } catch (_) {
      return; // unreachable: the caller retries
    }
    if (response.status === 401) {
      refused(SENT_AND_REFUSED);
      return;
    }
    if (!response.ok || !response.body) return;
    document.body.dataset.locked = "false";
    try {
      await readEvents(response.body, controller.signal);
    } catch (_) {
      // The stream broke (or was aborted): the caller decides.
    }
  }

  // Server-sent events by hand: blocks end with a blank line; "event:" names one, "data:" lines carry it;
  // comments (": keepalive") and "retry:" are ignored.
  async function readEvents(body, signal) {
    const reader = body.pipeThrough(new TextDecoderStream()).getReader();
    signal.addEventListener("abort", () => reader.cancel().catch(() => {}));
    let buffer = "";
    let searchFrom = 0;
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value;
      let end = buffer.indexOf("\n\n", searchFrom);
      while (end >= 0) {
        dispatch(buffer.slice(0, end));
        buffer = buffer.slice(end + 2);
        end = buffer.indexOf("\n\n");
      }
      // A hello of 10,000 guards arrives in many chunks: do not scan it from its start each time.
      searchFrom = Math.max(0, buffer.length - 1);
    }
  }

  function dispatch(block) {
    let type = "message";
    const data = [];
    for (const line of block.split("\n")) {
      if (line.startsWith("event:")) type = line.slice(6).trim();
      else if (line.startsWith("data:")) data.push(line.slice(line.startsWith("data: ") ? 6 : 5));
    }
    const handler = HANDLERS[type];
    if (handler && data.length) handler({ data: data.join("\n") });
  }

  // --- wiring ------------------------------------------------------------------------------

  function onFilter() {
    const started = performance.now();
    filters.prefix = $("filter-prefix").value;
    filters.state = $("filter-state").value;
    viewDirty = true;
    grid.scrollTop = 0;
    render();
    metrics.lastFilterMs = performance.now() - started;
  }

  $("filter-prefix").addEventListener("input", onFilter);
  $("filter-state").addEventListener("change", onFilter);
  grid.addEventListener("scroll", scheduleRender, { passive: true });
  window.addEventListener("resize", scheduleRender);
  rowsBody.addEventListener("click", (click) => {
    const row = click.target.closest("tr.row");
    if (row && row.dataset.taskKey) select(row.dataset.taskKey);
  });
  for (const list of [feedList, historyList]) {
    list.addEventListener("click", (click) => {
      const item = click.target.closest("li[data-task-key]");
      if (item && store.guards.has(item.dataset.taskKey)) select(item.dataset.taskKey);
    });
  }
  $("unlock").addEventListener("click", unlock);
  $("viewer-token").addEventListener("keydown", (key) => {
    if (key.key === "Enter") unlock();
  });
  $("use-token").addEventListener("click", useToken);
  $("token").addEventListener("keydown", (key) => {
    if (key.key === "Enter") useToken();
  });
  $("forget-token").addEventListener("click", forgetToken);
  $("approve").addEventListener("click", () => ask("approve-retry"));
  $("force").addEventListener("click", () => ask("force-release"));
  $("reason").addEventListener("input", () => {
    $("reason-ok").disabled = !$("reason").value.trim();
  });
  $("reason").addEventListener("keydown", (key) => {
    if (key.key === "Enter") {
      key.preventDefault();
      confirmAction();
    }
  });
  $("reason-ok").addEventListener("click", confirmAction);
  $("reason-cancel").addEventListener("click", closeDialog);
  $("reason-dialog").addEventListener("close", () => {
    pending = null;
  });

  // Ages, expiries and time-made staleness move with the clock: once a second, for the rows in view.
  setInterval(() => {
    viewDirty = true;
    scheduleRender();
    if (store.selected) updateButtons();
  }, 1000);

  showToken();
  showConnection();
  connect();
})();
