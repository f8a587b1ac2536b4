"""``taskguard dashboard``: a live web page of the guards, for operators.

A separate process and a client of the sidecar like any other watcher:

* ``follow.py`` follows WatchGuards (from the oldest event the sidecar's log keeps, snapshot first, then live
  events, resumed by revision after a disconnect) and knows whether that watch is up, and why not;
* ``state.py`` keeps what it knows: every guard, a capped feed of events, each key's recent history, refilled
  from the sidecar's log when the dashboard starts;
* ``access.py`` keeps the viewer token, without which nothing but the page itself is served (the dashboard
  reads the sidecar with its own user's access; any local user can reach its port);
* ``app.py`` serves the page (``static/``: plain HTML, CSS and JavaScript, no build step, nothing fetched
  from elsewhere), pushes changes to it as server-sent events, and forwards the operator actions
  (approve-retry, force-release) with the operator token the page presents, which it checks when entered.
"""
