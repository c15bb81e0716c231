// failover dashboard: polls /api/v1/dashboard/state and draws it. No build step, no dependencies.
// Every value from the server is written with textContent, never as HTML.
(function () {
  "use strict";

  var POLL_MS = 1000;
  var STORE_ORDER = ["postgres", "mongodb", "redis"];
  var TOKEN_KEY = "failover-token";
  var busy = {};

  // A token given as /#token=... (a fragment never reaches the server or its logs) is kept
  // for this tab and removed from the address bar.
  var fragment = new URLSearchParams(window.location.hash.replace(/^#/, ""));
  if (fragment.has("token")) {
    try { window.sessionStorage.setItem(TOKEN_KEY, fragment.get("token")); } catch (e) { /* storage disabled */ }
    window.__failoverToken = fragment.get("token");
    window.history.replaceState(null, "", window.location.pathname + window.location.search);
  }

  function token() {
    if (window.__failoverToken) { return window.__failoverToken; }
    try { return window.sessionStorage.getItem(TOKEN_KEY); } catch (e) { return null; }
  }

  function headers() {
    var h = { "Accept": "application/json" };
    var t = token();
    if (t) { h["Authorization"] = "Bearer " + t; }
    return h;
  }

  function el(tag, attrs, children) {
    var node = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (key) {
      if (key === "text") { node.textContent = attrs[key]; }
      else if (key === "className") { node.className = attrs[key]; }
      else if (key.indexOf("data-") === 0 || key === "title" || key === "type") { node.setAttribute(key, attrs[key]); }
      else { node[key] = attrs[key]; }
    });
    (children || []).forEach(function (child) { if (child) { node.appendChild(child); } });
    return node;
  }

  function time(seconds) {
    if (typeof seconds !== "number") { return ""; }
    return new Date(seconds * 1000).toLocaleTimeString();
  }

  function ms(value) {
    return typeof value === "number" ? value.toFixed(1) + " ms" : "–";
  }

  function endpointRows(store, role, ep, activeRole, processes) {
    var up = ep.available;
    var proc = processes[store + "." + role];
    var reason = ep.breaker_open ? "breaker open: " + (ep.reason || "") : (up ? ep.reason : (ep.last_error || ep.reason)) || "";
    var rows = [el("tr", { "data-role": role, "data-available": String(up), className: role === activeRole ? "active-row" : "" }, [
      el("td", { text: role + (role === activeRole ? " ◀" : "") }),
      el("td", { text: ep.name, title: ep.url || "" }),
      el("td", {}, [el("span", { className: "badge " + (up ? "up" : "down"), "data-field": "health", text: up ? "up" : "down" })]),
      el("td", { "data-field": "latency", text: ms(ep.probe_latency_ms) }),
      el("td", { text: proc ? proc.state : "" })
    ])];
    rows.push(el("tr", { className: "reason-row" + (role === activeRole ? " active-row" : "") }, [
      el("td", { className: "reason", colSpan: 5, text: reason })
    ]));
    return rows;
  }

  function localButtons(store, endpoints) {
    var box = el("div", { className: "buttons" });
    ["primary", "fallback"].forEach(function (role) {
      if (!endpoints[role]) { return; }
      [["kill", "Kill " + role, "danger"], ["stop", "Hang " + role, "danger"], ["start", "Start " + role, ""]].forEach(function (spec) {
        var key = store + "/" + role + "/" + spec[0];
        if (role === "fallback" && spec[0] === "stop") { return; }
        var button = el("button", {
          type: "button", className: spec[2], text: spec[1],
          "data-action": spec[0], "data-role": role, "data-store": store
        });
        button.disabled = !!busy[key];
        button.addEventListener("click", function () { act(store, role, spec[0]); });
        box.appendChild(button);
      });
    });
    return box;
  }

  function duration(seconds) {
    if (typeof seconds !== "number") { return ""; }
    return seconds < 1 ? (seconds * 1000).toFixed(0) + " ms" : seconds.toFixed(seconds < 10 ? 2 : 0) + " s";
  }

  function count(value) {
    return typeof value === "number" ? String(value) : "–";
  }

  // The reconcile block: writes captured on the fallback on their way to the primary.
  function reconcileBlock(rc, run) {
    if (!rc || !rc.enabled) {
      return el("div", { className: "reconcile off", "data-field": "reconcile", "data-enabled": "false", text: "reconcile: off" });
    }
    var stats = [
      ["backlog", count(rc.backlog)], ["applied", count(rc.applied)], ["conflicts", count(rc.conflicts)],
      ["rate", typeof rc.rate_per_s === "number" ? rc.rate_per_s + "/s" : "–"], ["state", rc.state || ""]
    ].map(function (pair) {
      return el("span", { "data-reconcile": pair[0] }, [
        el("span", { className: "muted", text: pair[0] + " " }), el("b", { text: pair[1] })
      ]);
    });
    var children = [el("div", { className: "reconcile-stats" }, stats)];
    if (run) {
      var percent = Math.max(0, Math.min(100, Math.round(run.done * 100)));
      var bar = el("div", { className: "bar" });
      bar.style.width = percent + "%";
      children.push(el("div", {
        className: "progress", "data-field": "reconcile-progress", "data-done": String(run.done),
        title: (run.gated ? "reconciling before failback" : "sweeping writes left on the fallback")
      }, [bar]));
      children.push(el("div", {
        className: "muted", "data-field": "reconcile-progress-text",
        text: "copied " + Math.max(0, run.start_backlog - run.backlog) + " of " + Math.max(run.start_backlog, run.backlog) +
          " (" + percent + "%) · started " + time(run.started_at)
      }));
    }
    var last = rc.last_run;
    if (last) {
      children.push(el("div", {
        className: "muted", "data-field": "reconcile-last-run",
        text: "last run " + time(last.started_at) + ": " + last.result + " · " + last.applied + " applied, " +
          last.conflicts + " conflicts in " + duration(last.duration_s) +
          (typeof last.hold_s === "number" ? " · writes held " + duration(last.hold_s) : "")
      }));
    }
    if (rc.unprotected_tables && rc.unprotected_tables.length) {
      children.push(el("div", {
        className: "warning", "data-field": "reconcile-unprotected",
        text: "not reconciled (no primary key): " + rc.unprotected_tables.join(", ")
      }));
    }
    if (rc.error) {
      children.push(el("div", { className: "reason", "data-field": "reconcile-error", text: rc.error }));
    }
    return el("div", { className: "reconcile", "data-field": "reconcile", "data-enabled": "true" }, [
      el("h3", { text: "Reconcile" + (rc.policy ? " · " + rc.policy : "") })
    ].concat(children));
  }

  // The warm sync block: how far the fallback trails the primary, and the initial copy while it runs.
  function warmBlock(w) {
    if (!w || !w.enabled) {
      return el("div", { className: "reconcile off", "data-field": "warm", "data-enabled": "false", text: "warm sync: off" });
    }
    var lag = typeof w.lag_s === "number" ? (w.lag_s < 0.001 ? "< 1 ms" : duration(w.lag_s)) : "–";
    var stats = [["state", w.state || ""], ["lag", lag],
      ["RPO at last failover", typeof w.rpo_at_last_failover_s === "number" ? duration(w.rpo_at_last_failover_s) : "–"]
    ].map(function (pair) {
      return el("span", { "data-warm": pair[0] }, [el("span", { className: "muted", text: pair[0] + " " }), el("b", { text: pair[1] })]);
    });
    var children = [el("div", { className: "reconcile-stats" }, stats)];
    var copy = w.copy;
    if (copy && typeof copy.rows_done === "number") {
      var done = copy.rows_total ? Math.max(0, Math.min(1, copy.rows_done / copy.rows_total)) : 0;
      var bar = el("div", { className: "bar" });
      bar.style.width = Math.round(done * 100) + "%";
      children.push(el("div", { className: "progress", "data-field": "warm-copy", "data-done": String(done) }, [bar]));
      children.push(el("div", {
        className: "muted", "data-field": "warm-copy-text",
        text: "initial copy: " + copy.rows_done + " of " + (copy.rows_total === null ? "?" : copy.rows_total) + " rows" +
          (typeof copy.rate_per_s === "number" ? " · " + Math.round(copy.rate_per_s) + " rows/s" : "") +
          (typeof copy.eta_s === "number" ? " · ETA " + duration(copy.eta_s) : "")
      }));
    }
    var why = w.error || (w.state === "off" ? w.reason : null);
    if (why) { children.push(el("div", { className: "reason", "data-field": "warm-reason", text: why })); }
    return el("div", { className: "reconcile", "data-field": "warm", "data-enabled": "true", "data-state": w.state || "" }, [
      el("h3", { text: "Warm fallback" + (w.mechanism ? " · " + w.mechanism : "") })
    ].concat(children));
  }

  function storeCard(name, st, local, processes, run) {
    var endpoints = st.endpoints || {};
    var rows = [];
    ["primary", "fallback"].filter(function (r) { return endpoints[r]; }).forEach(function (r) {
      rows = rows.concat(endpointRows(name, r, endpoints[r], st.active_role, processes));
    });
    var transitions = (st.transitions || []).slice(0, 8).map(function (t) {
      return el("tr", {}, [
        el("td", { text: time(t.at) }),
        el("td", { text: t.from + " → " + t.to }),
        el("td", { className: "reason", text: t.reason })
      ]);
    });
    var counters = st.counters || {};
    return el("section", {
      className: "store", "data-store": name, "data-state": st.state || "", "data-active-role": st.active_role || "none"
    }, [
      el("h2", {}, [el("span", { text: name }), el("span", { className: "badge " + st.state, "data-field": "state", text: st.state })]),
      el("div", { className: "serving" }, [
        document.createTextNode("Serving from "),
        el("b", { "data-field": "current_db", text: st.current_db || "nothing (no usable endpoint)" }),
        document.createTextNode(st.active_role ? " (" + st.active_role + ")" : ""),
        document.createTextNode(st.pinned ? " · pinned to " + st.pinned : "")
      ]),
      el("table", { className: "endpoints" }, [
        el("thead", {}, [el("tr", {}, ["role", "endpoint", "health", "probe", "process"].map(function (h) { return el("th", { text: h }); }))]),
        el("tbody", {}, rows)
      ]),
      local ? localButtons(name, endpoints) : null,
      el("div", { className: "counters" }, Object.keys(counters).map(function (k) {
        return el("span", { "data-counter": k, text: k + ": " + counters[k] });
      })),
      reconcileBlock(st.reconcile, run),
      warmBlock(st.warm),
      el("h3", { text: "Transitions" }),
      el("table", { className: "transitions" }, [el("tbody", {}, transitions.length ? transitions : [el("tr", {}, [el("td", { text: "none yet" })])])])
    ]);
  }

  function eventDetail(e) {
    if (e.reason) {
      return (e.from_state ? e.from_state + " → " + e.to_state + ": " : "") + e.reason +
        (typeof e.rpo_s === "number" ? " · RPO " + duration(e.rpo_s) : "");
    }
    if (e.kind === "ReconcileStarted") { return "backlog " + e.backlog + (e.gated ? ", before failback" : ", sweep"); }
    if (e.kind === "ReconcileCompleted") {
      return e.result + ": " + e.applied + " applied, " + e.conflicts + " conflicts in " + duration(e.duration);
    }
    if (e.kind === "ConflictResolved") { return e.key + ": " + e.resolution + (e.detail ? " (" + e.detail + ")" : ""); }
    return e.endpoint || "";
  }

  function conflictRows(conflicts) {
    if (!conflicts.length) { return [el("tr", {}, [el("td", { colSpan: 5, className: "muted", text: "none recorded" })])]; }
    return conflicts.map(function (c) {
      return el("tr", { "data-conflict-store": c.store }, [
        el("td", { text: time(c.at) }),
        el("td", { text: c.store }),
        el("td", { className: "key", "data-field": "conflict-key", text: c.key }),
        el("td", {}, [el("span", { className: "badge " + c.resolution, "data-field": "conflict-resolution", text: c.resolution })]),
        el("td", { className: "reason", text: c.detail || "" })
      ]);
    });
  }

  function render(state) {
    var status = state.status || {};
    var overall = document.getElementById("overall");
    overall.textContent = status.overall_status || "unknown";
    overall.className = "badge " + (status.overall_status || "");
    overall.setAttribute("data-overall", status.overall_status || "");
    document.getElementById("updated").textContent = "updated " + time(state.generated_at) + (state.local_mode ? " · local mode" : "");
    var processes = {};
    (state.local || []).forEach(function (p) { processes[p.store + "." + p.role] = p; });
    var main = document.getElementById("stores");
    var cards = STORE_ORDER.filter(function (n) { return status[n]; }).map(function (n) {
      return storeCard(n, status[n], state.local_mode, processes, (state.reconcile_runs || {})[n]);
    });
    main.replaceChildren.apply(main, cards);
    var conflictBody = document.querySelector("#conflicts tbody");
    if (conflictBody) { conflictBody.replaceChildren.apply(conflictBody, conflictRows(state.conflicts || [])); }
    var body = document.querySelector("#events tbody");
    body.replaceChildren.apply(body, (state.events || []).slice(0, 20).map(function (e) {
      return el("tr", {}, [el("td", { text: time(e.at) }), el("td", { text: e.store }), el("td", { text: e.kind }), el("td", { className: "reason", text: eventDetail(e) })]);
    }));
  }

  function showError(text) {
    var box = document.getElementById("error");
    box.textContent = text || "";
    box.hidden = !text;
  }

  function act(store, role, action) {
    var key = store + "/" + role + "/" + action;
    busy[key] = true;
    var h = headers();
    h["X-Failover-Action"] = "1";
    fetch("/api/v1/local/" + store + "/" + role + "/" + action, { method: "POST", headers: h })
      .then(function (r) { if (!r.ok) { showError(action + " " + store + " " + role + " failed: HTTP " + r.status); } })
      .catch(function (err) { showError(action + " failed: " + err); })
      .then(function () { delete busy[key]; poll(true); });
  }

  var timer = null;
  function poll(once) {
    fetch("/api/v1/dashboard/state", { headers: headers(), cache: "no-store" })
      .then(function (r) {
        if (r.status === 401) { throw new Error("a token is required: open this page as /#token=…"); }
        if (!r.ok) { throw new Error("HTTP " + r.status); }
        return r.json();
      })
      .then(function (state) { showError(""); render(state); })
      .catch(function (err) { showError("cannot load the state: " + err.message); })
      .then(function () {
        if (once) { return; }
        timer = window.setTimeout(poll, POLL_MS);
      });
  }

  window.failoverDashboard = { poll: poll, render: render };
  poll();
}());
