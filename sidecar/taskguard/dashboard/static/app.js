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
// written only when their text changed. The feed keeps at most feed_cap events. All text goes in through
// textContent, never as HTML.
//
// Times: one presentation everywhere, this browser's local time with its zone shown (in the header, the
// started column's heading and each full time), UTC on hover. While the page is not live (the sidecar or the
// dashboard unreachable) the guards are what was last known: ages, expiries and time-made staleness stop at
// the moment it was last live, and the actions are off.
//
// Keyboard: the table is one tab stop (a grid); the arrow keys, Page Up/Down, Home and End choose a guard,
// Enter opens it (focus moves to its pane, whose actions come next in tab order), Escape goes back.
(() => {
  "use strict";

  const OVERSCAN = 12;
  const TOKEN_KEY = "taskguard.operatorToken";
  const VIEWER_KEY = "taskguard.viewerToken";
  const RECONNECT_MS = 1000;
  const NAME_KEY = "taskguard.operatorName";
  const APPROVABLE = new Set(["FAILED", "ABANDONED", "EXPIRED"]);
  const REFUSALS = new Set(["DUPLICATE_REFUSED", "RETRY_REFUSED", "LOCK_DELAY_REFUSED", "QUEUE_FULL_REFUSED"]);
  const COLUMNS = 9;
  const C = { key: 0, state: 1, holder: 2, age: 3, expires: 4, dups: 5, run: 6, started: 7, token: 8 };
  const CELL_CLASSES = ["c-key", "c-state state", "c-holder", "c-age", "c-expires", "c-dups num", "c-run opt",
    "c-started opt", "c-token num opt"];
  const RESULT_CLEAR_MS = { ok: 10000, error: 30000 };
  const HISTORY_DELAY_MS = 150; // a held arrow key does not fetch every history it passes
  const number = new Intl.NumberFormat("en-US");

  const $ = (id) => document.getElementById(id);
  const grid = $("grid");
  const table = $("guards");
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
    connection: { state: "connecting", message: "", since: null, reason: "", last_live_at: null },
    dashboardDown: false,
    liveUntil: null, // while not live: the moment the guards are known as of (ms)
  };
  const filters = { prefix: "", state: "" };
  const pool = []; // the <tr> elements in use, in display order
  let rowHeight = 28;
  let viewDirty = true;
  let renderQueued = false;
  let history = { key: null, loading: false, newest: 0, held: [] };
  let historyTimer = null;

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

  // --- time: local with the zone shown, UTC on hover ----------------------------------------

  const ZONE_NAME = (() => {
    try {
      return Intl.DateTimeFormat().resolvedOptions().timeZone || "";
    } catch (_) {
      return "";
    }
  })();

  function pad(value) {
    return String(value).padStart(2, "0");
  }

  // The zone of a moment as an offset: "UTC", "UTC+1", "UTC+5:30", "UTC-4" (daylight saving moves it).
  function zoneOf(ms) {
    const minutes = -new Date(ms).getTimezoneOffset();
    if (minutes === 0) return "UTC";
    const size = Math.abs(minutes);
    const rest = size % 60;
    return `UTC${minutes > 0 ? "+" : "-"}${Math.floor(size / 60)}${rest ? `:${pad(rest)}` : ""}`;
  }

  function clockOf(ms) {
    const at = new Date(ms);
    return `${pad(at.getHours())}:${pad(at.getMinutes())}:${pad(at.getSeconds())}`;
  }

  function dayOf(ms) {
    const at = new Date(ms);
    return `${at.getFullYear()}-${pad(at.getMonth() + 1)}-${pad(at.getDate())}`;
  }

  // What the hover shows: the same moment in UTC, to the millisecond.
  function utcOf(ms) {
    return Number.isNaN(ms) ? "" : new Date(ms).toISOString().replace("T", " ").replace("Z", " UTC");
  }

  // In a column or a list whose heading names the zone: the time of day, or the day too when far off.
  function shortTime(ms, now) {
    if (Number.isNaN(ms)) return "-";
    if (Math.abs(now - ms) < 20 * 3600 * 1000) return clockOf(ms);
    return `${dayOf(ms).slice(5)} ${clockOf(ms).slice(0, 5)}`;
  }

  // Standing alone: day, time and zone.
  function fullTime(ms) {
    return Number.isNaN(ms) ? "-" : `${dayOf(ms)} ${clockOf(ms)} ${zoneOf(ms)}`;
  }

  function timeAndZone(ms) {
    return `${clockOf(ms)} ${zoneOf(ms)}`;
  }

  function parseTime(text) {
    return text ? Date.parse(text) : NaN;
  }

  function showZone() {
    const now = Date.now();
    const zone = zoneOf(now);
    const label = $("zone");
    label.dataset.zone = zone;
    const named = ZONE_NAME && ZONE_NAME !== "UTC" && ZONE_NAME !== "Etc/UTC" ? ` (${ZONE_NAME})` : "";
    label.textContent = zone === "UTC" && !named ? "times: UTC" : `times: ${zone}${named}, UTC on hover`;
    $("started-head").textContent = `started (${zone})`;
    $("feed-title").replaceChildren("Live events ", hint(`(${zone})`));
  }

  function hint(text) {
    const span = document.createElement("span");
    span.className = "hint";
    span.textContent = text;
    return span;
  }

  // --- live or last known --------------------------------------------------------------------

  // Whether what the page shows is live: the dashboard reachable and its watch of the sidecar up.
  function live() {
    return !store.dashboardDown && store.connection.state === "up";
  }

  // The moment the guards are known as of: now while live, else when they were last live.
  function dataNow() {
    return live() || store.liveUntil === null ? Date.now() : store.liveUntil;
  }

  // After any change of the connection: the first moment not live is kept until live again (nothing changes
  // the guards meanwhile). The dashboard's word on when its watch was last up, or the page's own clock when
  // the page lost the dashboard.
  function noteLiveness() {
    if (live()) {
      store.liveUntil = null;
      return;
    }
    if (store.liveUntil !== null) return;
    const connection = store.connection;
    const said = connection.state === "down" ? parseTime(connection.last_live_at || connection.since) : NaN;
    store.liveUntil = store.dashboardDown || Number.isNaN(said) ? Date.now() : said;
  }

  function whyNotLive() {
    if (store.dashboardDown) return "the dashboard is unreachable";
    const connection = store.connection;
    if (connection.state === "down") {
      return connection.reason === "stopped" ? "the sidecar stopped" : "the sidecar is unreachable";
    }
    return "the dashboard is still connecting to the sidecar";
  }

  function showLiveness() {
    const isLive = live();
    grid.dataset.live = String(isLive);
    const line = $("last-known");
    if (isLive || store.guards.size === 0) {
      line.hidden = true;
      delete line.dataset.asOf;
      return;
    }
    const asOf = dataNow();
    line.dataset.asOf = new Date(asOf).toISOString();
    line.title = `as of ${utcOf(asOf)}`;
    line.textContent = `Last known state, as of ${timeAndZone(asOf)} (${dayOf(asOf)}): not live, ${whyNotLive()}. ` +
      "Ages and expiries are stopped at that time; actions are off until it is live again.";
    line.hidden = false;
  }

  // --- guards ------------------------------------------------------------------------------

  function parsed(guard) {
    guard.startedMs = parseTime(guard.started_at);
    guard.expiresMs = parseTime(guard.expires_at);
    guard.seenMs = guard.heartbeat_at ? Date.parse(guard.heartbeat_at) : guard.startedMs;
    if (guard.duplicate_total === undefined) guard.duplicate_total = guard.duplicate_count;
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
      case "queued":
        return queueLength(guard) > 0;
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
    table.setAttribute("aria-rowcount", String(view.length + 1));
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
    row.setAttribute("aria-selected", "false");
    for (let i = 0; i < COLUMNS; i += 1) {
      const cell = document.createElement("td");
      cell.className = CELL_CLASSES[i];
      row.append(cell);
    }
    row._text = new Array(COLUMNS).fill(null);
    row._title = new Array(COLUMNS).fill(null);
    return row;
  }

  function render() {
    const started = performance.now();
    const now = dataNow();
    if (viewDirty) recomputeView(now);
    const view = store.view;
    const head = table.tHead.offsetHeight;
    const first = Math.max(0, Math.floor(grid.scrollTop / rowHeight) - OVERSCAN);
    const wanted = Math.ceil(Math.max(grid.clientHeight - head, rowHeight) / rowHeight) + 1 + 2 * OVERSCAN;
    const shown = Math.max(0, Math.min(view.length - first, wanted));
    while (pool.length < shown) {
      const row = newRow();
      rowsBody.insertBefore(row, spacerBottom);
      pool.push(row);
    }
    while (pool.length > shown) pool.pop().remove();
    let active = null;
    for (let i = 0; i < shown; i += 1) {
      const row = pool[i];
      fillRow(row, store.guards.get(view[first + i]), first + i, now);
      if (row.dataset.taskKey === store.selected) active = row.id;
    }
    if (active) table.setAttribute("aria-activedescendant", active);
    else table.removeAttribute("aria-activedescendant");
    setSpacer(spacerTop, first * rowHeight);
    setSpacer(spacerBottom, (view.length - first - shown) * rowHeight);
    $("empty").hidden = view.length > 0;
    if (pool.length > 0 && metrics.firstRenderMs === null) {
      rowHeight = pool[0].getBoundingClientRect().height || rowHeight;
      metrics.firstRenderMs = Math.round(performance.now());
    }
    showLiveness();
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

  function fillRow(row, guard, index, now) {
    if (row.dataset.taskKey !== guard.task_key) row.dataset.taskKey = guard.task_key;
    const id = `guard-row-${index}`;
    if (row.id !== id) {
      row.id = id;
      row.setAttribute("aria-rowindex", String(index + 2));
    }
    const stale = isStale(guard, now);
    const selected = store.selected === guard.task_key;
    const classes = `row${guard.awaiting_approval ? " awaiting" : ""}${stale ? " stale" : ""}${selected ? " selected" : ""}`;
    if (row.className !== classes) {
      row.className = classes;
      row.setAttribute("aria-selected", String(selected));
    }
    if (row.dataset.state !== guard.state) row.dataset.state = guard.state;
    // What does not fit at 1280 px is in the key's tooltip (and the detail pane).
    const started = Number.isNaN(guard.startedMs) ? "-" : `${fullTime(guard.startedMs)} (${utcOf(guard.startedMs)})`;
    setCell(row, C.key, guard.task_key,
      `${guard.task_key}\nrun ${guard.run_id}\nstarted ${started}\nfencing token ${guard.fencing_token}`);
    setState(row, guard, stale);
    setCell(row, C.holder, guard.holder || "-");
    setCell(row, C.age, Number.isNaN(guard.startedMs) ? "-" : span(now - guard.startedMs),
      Number.isNaN(guard.startedMs) ? "" : `started ${started}`);
    setCell(row, C.expires, expires(guard, now),
      Number.isNaN(guard.expiresMs) ? "no TTL" : `expires ${fullTime(guard.expiresMs)} (${utcOf(guard.expiresMs)})`);
    setDups(row, guard);
    setCell(row, C.run, shortId(guard.run_id), guard.run_id);
    setCell(row, C.started, shortTime(guard.startedMs, now), utcOf(guard.startedMs));
    setCell(row, C.token, String(guard.fencing_token), `fencing token ${guard.fencing_token}`);
  }

  function dupsTitle(guard) {
    const run = guard.duplicate_count;
    return `${run} refused in this run, ${guard.duplicate_total} for this key (every run in the sidecar's event log)`;
  }

  function setDups(row, guard) {
    const mark = `${guard.duplicate_count}|${guard.duplicate_total}`;
    const cell = row.cells[C.dups];
    if (row._text[C.dups] !== mark) {
      row._text[C.dups] = mark;
      const total = document.createElement("span");
      total.className = "total";
      total.textContent = ` / ${number.format(guard.duplicate_total)}`;
      cell.replaceChildren(number.format(guard.duplicate_count), total);
      cell.dataset.run = String(guard.duplicate_count);
      cell.dataset.total = String(guard.duplicate_total);
      cell.title = dupsTitle(guard);
      cell.setAttribute("aria-label", dupsTitle(guard));
      cell.className = guard.duplicate_total > 0 ? "c-dups num dups-some" : "c-dups num";
    }
  }

  // "FAILED" plus its badges; a screen reader reads "FAILED, awaiting approval", not "FAILEDawaiting approval".
  function setState(row, guard, stale) {
    const delayed = lockDelayed(guard);
    const queued = queueLength(guard);
    const stopping = guard.state === "RUNNING" && Boolean(guard.stop_requested_by);
    const runs = guard.runs || 0;
    const mark = `${guard.state}|${guard.awaiting_approval}|${stale}|${delayed}|${queued}|${stopping}|${runs}`;
    if (row._text[C.state] === mark) return;
    row._text[C.state] = mark;
    const cell = row.cells[C.state];
    cell.className = `c-state state s-${guard.state}`;
    cell.dataset.queue = String(queued);
    const parts = [guard.state];
    if (guard.awaiting_approval) parts.push(separator(), tag("tag-awaiting", "awaiting approval"));
    if (stale) parts.push(separator(), tag("tag-stale", "stale"));
    if (stopping) parts.push(separator(), tag("tag-stale tag-stop", "stop requested"));
    if (delayed) parts.push(separator(), tag("tag-stale tag-lock-delay", "lock-delay"));
    if (queued) parts.push(separator(), tag("tag-queue", `queue ${number.format(queued)}`));
    // A key several runs hold at once (its rule's max_holders).
    if (runs > 1 || (guard.holders || []).length) {
      parts.push(separator(), tag("tag-queue tag-runs", runs === 1 ? "1 run" : `${number.format(runs)} runs`));
    }
    cell.replaceChildren(...parts);
    cell.title = stateText(guard, stale);
  }

  // A lost run's key that its rule's lock-delay still keeps closed (the sidecar refuses it with LOCK_DELAYED;
  // a key several runs may hold can be closed while its other runs go on).
  function lockDelayed(guard) {
    return Boolean(guard.lock_delay_until) && Date.parse(guard.lock_delay_until) > dataNow();
  }

  // Callers waiting for the key (QUEUE and KEEP_NEWEST acquisitions), served first in line first.
  function queueLength(guard) {
    return guard.queue_length || 0;
  }

  function stateText(guard, stale) {
    const delay = lockDelayed(guard) ? `, lock-delay until ${fullTime(parseTime(guard.lock_delay_until))}` : "";
    const queued = queueLength(guard) ? `, ${queueLength(guard)} queued` : "";
    return `${guard.state}${guard.awaiting_approval ? ", awaiting approval" : ""}${stale ? ", stale" : ""}${delay}${queued}`;
  }

  function separator() {
    const span = document.createElement("span");
    span.className = "sep";
    span.textContent = ", ";
    return span;
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
        return `${run(event.run_id, event.holder)} acquired${event.waiter_run_id ? " from the queue" : ""}, token ${event.fencing_token}`;
      case "DUPLICATE_REFUSED":
        return `refused ${run(event.trigger_run_id, event.trigger_holder)}; winner ${run(event.run_id, event.holder)}; ${event.duplicate_count} refused`;
      case "RETRY_REFUSED":
        return `refused ${run(event.trigger_run_id, event.trigger_holder)}: run ${short(event.run_id)} ended ${event.state}, a retry needs approval`;
      case "LOCK_DELAY_REFUSED":
        return `refused ${run(event.trigger_run_id, event.trigger_holder)}: run ${short(event.run_id)} was lost (${event.state}); lock-delay until ${untilText(event.lock_delay_until)}`;
      case "QUEUE_FULL_REFUSED":
        return `refused ${run(event.trigger_run_id, event.trigger_holder)}: the queue is full, ${event.queue_length} waiting behind run ${short(event.run_id)}`;
      case "QUEUED": {
        const ahead = event.state === "RUNNING" ? `behind ${run(event.run_id, event.holder)}` : `(the key is ${event.state} after run ${short(event.run_id)})`;
        return `${run(event.waiter_run_id, event.trigger_holder)} queued ${ahead}, position ${event.position ?? "-"} of ${event.queue_length}`;
      }
      case "DEQUEUED":
        return `run ${short(event.waiter_run_id)} left the queue${event.reason ? `: ${event.reason}` : ""}`;
      case "SUPERSEDED":
        return `run ${short(event.waiter_run_id)} superseded by ${run(event.trigger_run_id, event.trigger_holder)}`;
      case "STOP_REQUESTED":
        return `${run(event.run_id, event.holder)} asked to stop for ${run(event.trigger_run_id, event.trigger_holder)}`;
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

  // A time inside a line of text: local with its zone, as everywhere on the page.
  function untilText(text) {
    return text ? fullTime(parseTime(text)) : "-";
  }

  function piece(className, text, title) {
    const element = document.createElement("span");
    element.className = className;
    element.textContent = text;
    if (title !== undefined) element.title = title;
    return element;
  }

  function whenOf(event) {
    const at = parseTime(event.occurred_at);
    return piece("when", Number.isNaN(at) ? "" : shortTime(at, Date.now()), utcOf(at));
  }

  function eventItem(event, withKey) {
    const item = document.createElement("li");
    item.className = `event t-${event.type}${event.type === "RELEASED" && event.state === "FAILED" ? " failed" : ""}`;
    item.dataset.revision = String(event.revision);
    item.dataset.type = event.type;
    item.dataset.taskKey = event.task_key;
    item.dataset.runId = event.run_id;
    if (event.trigger_run_id) item.dataset.triggerRunId = event.trigger_run_id;
    if (event.waiter_run_id) item.dataset.waiterRunId = event.waiter_run_id;
    item._event = event;
    const parts = [whenOf(event), " ", piece("rev", `#${event.revision}`), " ", piece("type", event.type), " "];
    if (withKey) parts.push(piece("key", event.task_key), " ");
    parts.push(piece("text", describe(event), describe(event, (id) => id)));
    item.append(...parts);
    return item;
  }

  // Consecutive refusals of one key, as one line: "×50", the newest's time and the winner; the refusals
  // themselves inside, shown on demand.
  let groupIds = 0;

  function groupItem(type, key, withKey) {
    const item = document.createElement("li");
    item.className = `group t-${type}`;
    item.dataset.type = type;
    item.dataset.taskKey = key;
    const line = document.createElement("div");
    line.className = "line";
    const members = document.createElement("ol");
    members.className = "members";
    members.id = `refusals-${(groupIds += 1)}`;
    members.hidden = true;
    const expand = document.createElement("button");
    expand.type = "button";
    expand.className = "expand";
    expand.setAttribute("aria-expanded", "false");
    expand.setAttribute("aria-controls", members.id);
    item._line = line;
    item._members = members;
    item._expand = expand;
    item._withKey = withKey;
    item.append(line, members);
    return item;
  }

  function showGroup(item) {
    const members = item._members;
    const n = members.childElementCount;
    const newest = members.firstElementChild._event;
    const oldest = members.lastElementChild._event;
    item.dataset.count = String(n);
    item.dataset.revision = String(newest.revision);
    item._expand.textContent = `×${n}`;
    const shown = item._expand.getAttribute("aria-expanded") === "true";
    item._expand.setAttribute("aria-label", `${shown ? "hide" : "show"} the ${n} refusals of ${item.dataset.taskKey}`);
    const winner = `run ${shortId(newest.run_id)}${newest.holder ? ` (${newest.holder})` : ""}`;
    const text = {
      DUPLICATE_REFUSED: `${n} acquisitions refused; winner ${winner}; ${newest.duplicate_count} refused in its run`,
      RETRY_REFUSED: `${n} retries refused: run ${shortId(newest.run_id)} ended ${newest.state}, a retry needs approval`,
      LOCK_DELAY_REFUSED: `${n} acquisitions refused: run ${shortId(newest.run_id)} was lost (${newest.state}); lock-delay until ${untilText(newest.lock_delay_until)}`,
      QUEUE_FULL_REFUSED: `${n} acquisitions refused: the queue is full, ${newest.queue_length} waiting behind ${winner}`,
    }[newest.type];
    const parts = [whenOf(newest), " ", piece("rev", `#${oldest.revision}–#${newest.revision}`), " ",
      piece("type", newest.type), " "];
    if (item._withKey) parts.push(piece("key", item.dataset.taskKey), " ");
    parts.push(item._expand, piece("text", text));
    item._line.replaceChildren(...parts);
  }

  function toggleGroup(item) {
    const shown = item._expand.getAttribute("aria-expanded") !== "true";
    item._expand.setAttribute("aria-expanded", String(shown));
    item._members.hidden = !shown;
    showGroup(item);
  }

  // Add events (oldest first) at the top of a list (newest first), grouping refusals; keep at most `cap` events.
  // One the list has already (a restarted dashboard reading the log again) is not added twice.
  function addEvents(list, events, cap, withKey) {
    if (list._count === undefined) clearEvents(list);
    const start = Math.max(0, events.length - cap);
    for (let i = start; i < events.length; i += 1) {
      const event = events[i];
      if (event.revision <= list._newest) continue;
      list._newest = event.revision;
      const top = list.firstElementChild;
      const joins = REFUSALS.has(event.type) && top && top.dataset.type === event.type &&
        top.dataset.taskKey === event.task_key;
      if (joins && top.classList.contains("group")) {
        top._members.prepend(eventItem(event, false));
        showGroup(top);
      } else if (joins && top.classList.contains("event")) {
        const group = groupItem(event.type, event.task_key, withKey);
        list.replaceChild(group, top);
        group._members.append(eventItem(top._event, false));
        group._members.prepend(eventItem(event, false));
        showGroup(group);
      } else {
        list.prepend(eventItem(event, withKey));
      }
      list._count += 1;
    }
    trimEvents(list, cap);
  }

  function trimEvents(list, cap) {
    while (list._count > cap && list.lastElementChild) {
      const last = list.lastElementChild;
      if (last.classList.contains("group")) {
        last._members.lastElementChild.remove();
        if (last._members.childElementCount === 1) {
          list.replaceChild(eventItem(last._members.firstElementChild._event, last._withKey), last);
        } else {
          showGroup(last);
        }
      } else {
        last.remove();
      }
      list._count -= 1;
    }
  }

  function clearEvents(list) {
    list.replaceChildren();
    list._count = 0;
    list._newest = 0;
  }

  function showHistory(key, delay = 0) {
    if (historyTimer !== null) clearTimeout(historyTimer);
    historyTimer = null;
    history = { key, loading: true, newest: 0, held: [] };
    clearEvents(historyList);
    if (!proven) {
      historyList.replaceChildren(note("not connected to the dashboard"));
      return;
    }
    if (delay > 0) {
      historyTimer = setTimeout(() => {
        historyTimer = null;
        if (history.key === key) loadHistory(key);
      }, delay);
      return;
    }
    loadHistory(key);
  }

  function loadHistory(key) {
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
        clearEvents(historyList);
        // Events that came on the stream while the history was on its way: the newer ones follow it.
        const newest = body.events.length ? body.events[body.events.length - 1].revision : 0;
        const events = body.events.concat(history.held.filter((event) => event.revision > newest));
        addEvents(historyList, events, store.historyCap, false);
        history = { key, loading: false, newest: events.length ? events[events.length - 1].revision : 0, held: [] };
        if (!events.length) historyList.append(note("no event for this key in the sidecar's event log"));
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
    if (!history.key) return;
    const mine = events.filter((event) => event.task_key === history.key);
    if (history.loading) {
      history.held.push(...mine);
      return;
    }
    const fresh = mine.filter((event) => event.revision > history.newest);
    if (!fresh.length) return;
    const placeholder = historyList.querySelector("li.note");
    if (placeholder) placeholder.remove();
    addEvents(historyList, fresh, store.historyCap, false);
    history.newest = fresh[fresh.length - 1].revision;
  }

  // --- the selected guard ------------------------------------------------------------------

  function select(key, historyDelay = 0) {
    if (store.selected !== key) clearResult();
    store.selected = key;
    showDetail();
    showHistory(key, historyDelay);
    scheduleRender();
  }

  // The keyboard: move the selection within the filtered view, keeping it in sight.
  function moveSelection(where) {
    const view = store.view;
    if (!view.length) return;
    const current = store.selected === null ? -1 : view.indexOf(store.selected);
    const page = Math.max(1, Math.floor((grid.clientHeight - table.tHead.offsetHeight) / rowHeight) - 1);
    let index;
    switch (where) {
      case "next":
        index = current < 0 ? 0 : current + 1;
        break;
      case "previous":
        index = current < 0 ? view.length - 1 : current - 1;
        break;
      case "page-down":
        index = Math.max(0, current) + page;
        break;
      case "page-up":
        index = Math.max(0, current) - page;
        break;
      case "first":
        index = 0;
        break;
      default:
        index = view.length - 1;
    }
    index = Math.min(view.length - 1, Math.max(0, index));
    scrollToRow(index);
    select(view[index], HISTORY_DELAY_MS);
    render(); // now, so that aria-activedescendant names a row that exists
  }

  function scrollToRow(index) {
    const head = table.tHead.offsetHeight;
    const top = index * rowHeight;
    const visible = grid.clientHeight - head;
    if (top < grid.scrollTop) grid.scrollTop = top;
    else if (top + rowHeight > grid.scrollTop + visible) grid.scrollTop = top + rowHeight - visible;
  }

  const GRID_KEYS = {
    ArrowDown: "next",
    ArrowUp: "previous",
    PageDown: "page-down",
    PageUp: "page-up",
    Home: "first",
    End: "last",
  };

  function onGridKey(key) {
    if (key.altKey || key.ctrlKey || key.metaKey) return;
    const where = GRID_KEYS[key.key];
    if (where) {
      key.preventDefault();
      moveSelection(where);
    } else if (key.key === "Enter" && store.selected) {
      key.preventDefault();
      openSelected();
    }
  }

  // Enter: the chosen guard's pane takes the focus (its actions are the next tab stops).
  function openSelected() {
    if (historyTimer !== null) showHistory(store.selected);
    if (document.body.dataset.side === "collapsed") setSide(true);
    $("detail-title").focus();
  }

  function showDetail() {
    const key = store.selected;
    const guard = key ? store.guards.get(key) : null;
    $("detail-key").textContent = key || "";
    $("detail-hint").hidden = Boolean(key);
    const fields = $("detail-fields");
    const rows = [];
    if (guard) {
      const now = dataNow();
      const stale = isStale(guard, now);
      rows.push(
        ["state", stateText(guard, stale)],
        ["run id", guard.run_id],
        ["holder", guard.holder || "-"],
        ["attempt", `${guard.attempt}, fencing token ${guard.fencing_token}`],
        ["refused", `${guard.duplicate_count} in this run, ${guard.duplicate_total} over the runs in the event log`],
        ["started", guard.started_at, "started"],
      );
      if (guard.state === "RUNNING") {
        rows.push(["heartbeat", guard.heartbeat_at, "heartbeat"]);
        if (guard.expires_at) rows.push(["expires", guard.expires_at, "expires"]);
        else rows.push(["expires", guard.stream_bound ? "held by its Hold stream" : "-"]);
        if (guard.hold_until) rows.push(["max hold until", guard.hold_until, "hold-until"]);
        if (guard.stop_requested_by) {
          rows.push(["stop requested", `by run ${guard.stop_requested_by} (supersede)`]);
          if (guard.stop_at) rows.push(["force-released at", guard.stop_at, "stop-at"]);
        }
      } else if (guard.lock_delay_until) {
        rows.push(["lock-delay until", guard.lock_delay_until, "lock-delay-until"]);
      }
      if (queueLength(guard)) rows.push(["queue", `${queueLength(guard)} waiting, first in line first (below)`]);
      for (const other of guard.holders || []) {
        const expires = other.expires_at ? `, expires ${fullTime(parseTime(other.expires_at))}` : "";
        rows.push([
          "also held by",
          `run ${other.run_id} (${other.holder || "-"}), token ${other.fencing_token}, since ${fullTime(parseTime(other.started_at))}${expires}${other.stale ? ", stale" : ""}`,
        ]);
      }
      if (guard.released_at) rows.push(["released", guard.released_at, "released"]);
      if (guard.last_status) rows.push(["last status", guard.last_status]);
      if (guard.last_detail) rows.push(["detail", guard.last_detail]);
      if (guard.approved_by) rows.push(["approved by", `${guard.approved_by}: ${guard.approval_reason || "-"}`]);
      if (guard.released_by) rows.push(["released by", guard.released_by]);
      const labels = Object.entries(guard.labels || {});
      if (labels.length) rows.push(["labels", labels.map(([name, value]) => `${name}=${value}`).join(", ")]);
    }
    const nodes = [];
    for (const [name, value, time] of rows) {
      const term = document.createElement("dt");
      term.textContent = name;
      const text = document.createElement("dd");
      if (time) {
        const ms = parseTime(value);
        text.textContent = fullTime(ms);
        text.title = utcOf(ms);
        text.dataset.time = time;
      } else {
        text.textContent = value;
      }
      nodes.push(term, text);
    }
    fields.replaceChildren(...nodes);
    showWaiters(guard);
    updateButtons();
  }

  // The key's queue in the order the sidecar serves it: who, since when, until when at most, keep-newest.
  function showWaiters(guard) {
    const list = $("detail-waiters");
    const waiters = guard ? guard.waiters || [] : [];
    list.hidden = waiters.length === 0;
    list.replaceChildren(...waiters.map((waiter, index) => {
      const item = document.createElement("li");
      item.className = "waiter";
      item.dataset.runId = waiter.run_id;
      item.dataset.position = String(index + 1);
      const parts = [piece("w-run", `run ${waiter.run_id}`), waiter.holder ? ` (${waiter.holder})` : ""];
      const since = parseTime(waiter.queued_at);
      parts.push(", since ", piece("w-since", fullTime(since), utcOf(since)));
      const until = parseTime(waiter.wait_until);
      parts.push(", ", Number.isNaN(until) ? piece("w-until", "no max wait") :
        piece("w-until", `waits until ${fullTime(until)}`, utcOf(until)));
      if (waiter.keep_newest) parts.push(separator(), tag("tag-queue", "keep-newest"));
      item.append(...parts);
      return item;
    }));
  }

  // An action stays in the tab order when it cannot be used (aria-disabled, not disabled), so that a screen
  // reader still finds it, with why as its description; the visible line says why for the disabled ones.
  function setEnabled(button, enabled, label, why, shown) {
    button.setAttribute("aria-disabled", String(!enabled));
    button.setAttribute("aria-label", label);
    button.title = why;
    const reason = $(`${button.id}-why`);
    if (reason.textContent !== why) reason.textContent = why;
    reason.hidden = !shown;
  }

  function updateButtons() {
    const guard = store.selected ? store.guards.get(store.selected) : null;
    const token = usableToken();
    const approve = $("approve");
    const force = $("force");
    const key = guard ? guard.task_key : "";
    const isLive = live();
    const canApprove = Boolean(token && guard && isLive && (guard.awaiting_approval || APPROVABLE.has(guard.state)));
    const canForce = Boolean(token && guard && isLive && guard.state === "RUNNING");
    let why = "";
    if (!guard) why = "Choose a guard first.";
    else if (!isLive) why = `Actions are off: ${whyNotLive()}.`;
    else if (!token) why = "Paste the operator token first (top right).";
    const approveWhy = why || (canApprove ? "Let this key be acquired once more." : `A ${guard.state} guard needs no approval.`);
    const forceWhy = why || (canForce ? "End the running run as CANCELLED." : "Only a RUNNING guard can be force-released.");
    setEnabled(approve, canApprove, key ? `Approve retry of ${key}` : "Approve retry", approveWhy, !canApprove);
    // One reason for both (no guard, not live, no token) is said once.
    setEnabled(force, canForce, key ? `Force release of ${key}` : "Force release", forceWhy, !canForce && !why);
  }

  // --- the operator token -------------------------------------------------------------------

  // "none", "checking", "accepted", "unchecked" (kept; the sidecar could not be asked yet) or "refused".
  let tokenState = "none";

  function operatorToken() {
    return sessionStorage.getItem(TOKEN_KEY) || "";
  }

  function usableToken() {
    return tokenState === "accepted" || tokenState === "unchecked" ? operatorToken() : "";
  }

  const TOKEN_TEXT = {
    none: "no operator token: actions disabled",
    checking: "checking the operator token…",
    accepted: "operator token accepted (this tab only)",
    unchecked: "operator token kept, not checked yet (this tab only)",
    refused: "token not accepted: actions disabled",
  };

  function showToken(detail) {
    const state = $("token-state");
    state.dataset.state = tokenState;
    state.dataset.set = String(Boolean(usableToken()));
    state.textContent = TOKEN_TEXT[tokenState];
    state.title = detail || "";
    $("forget-token").hidden = !operatorToken();
    updateButtons();
  }

  function useToken() {
    const input = $("token");
    const token = input.value.trim();
    input.value = "";
    const name = $("operator").value.trim();
    if (name) sessionStorage.setItem(NAME_KEY, name);
    else sessionStorage.removeItem(NAME_KEY);
    if (token) {
      sessionStorage.setItem(TOKEN_KEY, token);
      checkToken();
    } else {
      showToken();
    }
  }

  function forgetToken() {
    sessionStorage.removeItem(TOKEN_KEY);
    tokenState = "none";
    showToken();
  }

  function tokenRefused(detail) {
    sessionStorage.removeItem(TOKEN_KEY);
    tokenState = "refused";
    showToken(detail);
  }

  // Ask the sidecar, through the dashboard, whether the token is an operator's: when it is entered, not when
  // an action is refused. Only a server that proved it is the dashboard is told the token.
  let tokenCheck = 0;

  async function checkToken() {
    const token = operatorToken();
    if (!token) {
      tokenState = "none";
      showToken();
      return;
    }
    if (!proven) {
      tokenState = "unchecked";
      showToken("not connected to the dashboard: the token is checked once it is");
      return;
    }
    const mine = (tokenCheck += 1);
    tokenState = "checking";
    showToken();
    let body;
    try {
      const response = await fetch("/api/check-operator-token", {
        method: "POST",
        cache: "no-store",
        credentials: "same-origin",
        headers: { ...viewerHeaders(), ...actionHeaders(token) },
        body: "{}",
      });
      if (response.status === 401) refused(SENT_AND_REFUSED);
      body = await response.json().catch(() => ({ ok: false, code: `HTTP ${response.status}`, error: response.statusText }));
    } catch (error) {
      body = { ok: false, code: "UNREACHABLE", error: `the dashboard did not answer (${error})` };
    }
    if (mine !== tokenCheck || operatorToken() !== token) return; // another token, or another check, since
    if (body.ok) {
      tokenState = "accepted";
      showToken();
    } else if (body.code === "PERMISSION_DENIED") {
      tokenRefused(body.error);
    } else {
      tokenState = "unchecked";
      showToken(`could not check it: ${body.error}`);
    }
  }

  function actionHeaders(token) {
    return { "Content-Type": "application/json", "X-TaskGuard-Dashboard": "1", "X-TaskGuard-Operator-Token": token };
  }

  // --- actions -----------------------------------------------------------------------------

  const ACTIONS = {
    "approve-retry": { title: "Approve a retry", button: "approve" },
    "force-release": { title: "Force-release the running run", button: "force" },
  };
  let pending = null;

  function ask(action) {
    const key = store.selected;
    if (!key || $(ACTIONS[action].button).getAttribute("aria-disabled") === "true") return;
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
    if (!proven || !live()) {
      result("error", `${action} ${key}: not live (${whyNotLive()}); nothing was sent`);
      return;
    }
    result("pending", `${action} ${key}…`);
    let body;
    try {
      const response = await fetch(`/api/${action}`, {
        method: "POST",
        cache: "no-store",
        credentials: "same-origin",
        headers: { ...viewerHeaders(), ...actionHeaders(operatorToken()) },
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
      if (body.code === "PERMISSION_DENIED") tokenRefused(body.error);
      result("error", `${action} ${key} failed: ${body.error}`);
    }
  }

  // The last action's result: it clears by itself (sooner when it went well), on dismiss, or when another
  // guard is chosen.
  let resultTimer = null;

  function result(outcome, text) {
    const line = $("action-result");
    line.dataset.outcome = outcome;
    line.textContent = text;
    line.title = text;
    $("result-dismiss").hidden = false;
    if (resultTimer !== null) clearTimeout(resultTimer);
    resultTimer = RESULT_CLEAR_MS[outcome] ? setTimeout(clearResult, RESULT_CLEAR_MS[outcome]) : null;
  }

  function clearResult() {
    if (resultTimer !== null) clearTimeout(resultTimer);
    resultTimer = null;
    const line = $("action-result");
    line.dataset.outcome = "";
    line.textContent = "";
    line.title = "";
    $("result-dismiss").hidden = true;
  }

  // --- connection --------------------------------------------------------------------------

  function showConnection() {
    const pill = $("connection");
    const banner = $("banner");
    const connection = store.connection;
    if (store.dashboardDown) {
      pill.dataset.state = "dashboard-down";
      pill.dataset.reason = "";
      pill.textContent = "dashboard unreachable";
      banner.dataset.kind = "dashboard";
      banner.dataset.reason = "";
      banner.textContent = "Lost the connection to the dashboard server. Showing the last known state; reconnecting by itself.";
      banner.hidden = false;
    } else {
      pill.dataset.state = connection.state;
      pill.dataset.reason = connection.reason || "";
      pill.title = connection.message || "";
      if (connection.state === "up") {
        pill.textContent = "live";
        banner.hidden = true;
        banner.dataset.kind = "";
      } else if (connection.state === "down") {
        const stopped = connection.reason === "stopped";
        pill.textContent = stopped ? "sidecar stopped" : "sidecar unreachable";
        const since = parseTime(connection.since);
        const at = Number.isNaN(since) ? "" : ` since ${timeAndZone(since)}`;
        banner.dataset.kind = "sidecar";
        banner.dataset.reason = connection.reason || "";
        banner.title = Number.isNaN(since) ? "" : `since ${utcOf(since)}`;
        banner.textContent = stopped
          ? `Sidecar stopped; waiting for it${at}. Showing the last known state; the dashboard catches up when it is back.`
          : `The sidecar is unreachable${at}: ${connection.message}. ` +
            "Showing the last known state; the dashboard reconnects by itself and catches up.";
        banner.hidden = false;
      } else {
        pill.textContent = "connecting…";
        banner.hidden = true;
      }
    }
    noteLiveness();
    viewDirty = true;
    showLiveness();
    updateButtons();
    scheduleRender();
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
    // A dashboard that restarted while the sidecar is away knows nothing yet: keep what this page knew, as
    // last known as of when it was (its snapshot replaces it when the sidecar is back).
    const knowsNothing = hello.guards.length === 0 && hello.connection.state !== "up" && store.guards.size > 0;
    if (!knowsNothing) {
      store.liveUntil = null;
      store.guards = new Map();
      for (const guard of hello.guards) store.guards.set(guard.task_key, parsed(guard));
      store.keys = Array.from(store.guards.keys()).sort();
      clearEvents(feedList);
      addEvents(feedList, hello.feed, store.feedCap, true);
    }
    viewDirty = true;
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
    if (tokenState !== "accepted" && operatorToken() && live()) checkToken();
  }

  function onBatch(message) {
    const batch = JSON.parse(message.data);
    metrics.batches += 1;
    metrics.events += batch.events.length;
    store.revision = Math.max(store.revision, batch.revision);
    for (const guard of batch.guards) putGuard(guard);
    viewDirty = true; // the counts move with every batch (one pass over the guards, at most ten times a second)
    if (batch.reset_feed) clearEvents(feedList);
    if (batch.events.length) addEvents(feedList, batch.events, store.feedCap, true);
    historyEvents(batch.events);
    if (store.selected && batch.guards.some((guard) => guard.task_key === store.selected)) showDetail();
    if (store.connection.state !== "up" && batch.events.length) {
      // Events flowing is proof enough; the status message says so too, right after.
      store.connection = { ...store.connection, state: "up", reason: "" };
      showConnection();
    }
    scheduleRender();
  }

  function onStatus(message) {
    const wasLive = live();
    store.connection = JSON.parse(message.data);
    showConnection();
    if (store.selected) showDetail();
    if (!wasLive && live() && tokenState === "unchecked") checkToken();
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

  function setSide(open) {
    document.body.dataset.side = open ? "open" : "collapsed";
    const toggle = $("side-toggle");
    toggle.setAttribute("aria-expanded", String(open));
    toggle.textContent = open ? "Hide details" : "Show details";
    scheduleRender();
  }

  $("filter-prefix").addEventListener("input", onFilter);
  $("filter-state").addEventListener("change", onFilter);
  grid.addEventListener("scroll", scheduleRender, { passive: true });
  window.addEventListener("resize", scheduleRender);
  table.addEventListener("keydown", onGridKey);
  rowsBody.addEventListener("click", (click) => {
    const row = click.target.closest("tr.row");
    if (row && row.dataset.taskKey) select(row.dataset.taskKey);
  });
  for (const list of [feedList, historyList]) {
    list.addEventListener("click", (click) => {
      const expand = click.target.closest("button.expand");
      if (expand) {
        toggleGroup(expand.closest("li.group"));
        return;
      }
      const item = click.target.closest("li[data-task-key]");
      if (item && store.guards.has(item.dataset.taskKey)) select(item.dataset.taskKey);
    });
  }
  $("side").addEventListener("keydown", (key) => {
    if (key.key === "Escape" && !$("reason-dialog").open) {
      key.preventDefault();
      table.focus();
    }
  });
  $("side-toggle").addEventListener("click", () => setSide(document.body.dataset.side === "collapsed"));
  $("unlock").addEventListener("click", unlock);
  $("viewer-token").addEventListener("keydown", (key) => {
    if (key.key === "Enter") unlock();
  });
  $("use-token").addEventListener("click", useToken);
  $("token").addEventListener("keydown", (key) => {
    if (key.key === "Enter") useToken();
  });
  $("forget-token").addEventListener("click", forgetToken);
  $("result-dismiss").addEventListener("click", clearResult);
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

  // Ages, expiries and time-made staleness move with the clock: once a second, for the rows in view (while
  // live; otherwise they stay at the moment the page was last live).
  setInterval(() => {
    if (!live()) return;
    viewDirty = true;
    scheduleRender();
    if (store.selected) updateButtons();
  }, 1000);
  // The zone can change under a running page (daylight saving, a laptop that travelled).
  setInterval(showZone, 60000);

  showZone();
  tokenState = operatorToken() ? "unchecked" : "none";
  showToken();
  showConnection();
  connect();
})();
