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

  function storeCard(name, st, local, processes) {
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
      el("h3", { text: "Transitions" }),
      el("table", { className: "transitions" }, [el("tbody", {}, transitions.length ? transitions : [el("tr", {}, [el("td", { text: "none yet" })])])])
    ]);
  }

  function eventDetail(e) {
    if (e.reason) { return (e.from_state ? e.from_state + " → " + e.to_state + ": " : "") + e.reason; }
    return e.endpoint || "";
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
      return storeCard(n, status[n], state.local_mode, processes);
    });
    main.replaceChildren.apply(main, cards);
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
