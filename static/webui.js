// vmworker web UI: live dashboard, VM page refresh, actions.
//
// Every form works without this script (plain POST, the server answers
// with a redirect). With it, forms marked .js-action are sent with fetch(),
// destroy asks in a dialog first, the dashboard's VM table is rebuilt from
// /vmachines/list every 2 s and a VM page swaps in its live parts.
// Text from the server is only ever put in the page with textContent;
// the HTML fragments swapped in come from the worker's own templates,
// which escape everything.
(function () {
  "use strict";

  const POLL_MS = 2000;
  const csrf = () => document.querySelector('meta[name="csrf-token"]').content;

  // -- small helpers ----------------------------------------------------------

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === undefined || value === null || value === false) continue;
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = value;
      else node.setAttribute(key, value === true ? "" : String(value));
    }
    for (const child of children) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function toast(message, ok) {
    const box = document.getElementById("toasts");
    if (!box) return;
    const item = el("div", { class: "toast" + (ok === false ? " error" : ""), role: "status", text: message });
    box.append(item);
    setTimeout(() => item.remove(), ok === false ? 9000 : 4000);
  }

  async function post(url, data) {
    const resp = await fetch(url, {
      method: "POST",
      body: new URLSearchParams(data),
      headers: { "Accept": "application/json", "X-CSRF-Token": csrf() },
      credentials: "same-origin",
    });
    let body;
    try {
      body = await resp.json();
    } catch (err) {
      body = { success: false, message: `the worker answered HTTP ${resp.status}` };
    }
    if (!resp.ok || !body.success) throw new Error(body.message || `HTTP ${resp.status}`);
    return body;
  }

  function confirmDialog(title, text, okLabel) {
    const dialog = document.getElementById("confirm-dialog");
    if (!dialog || typeof dialog.showModal !== "function") {
      return Promise.resolve(window.confirm(text));
    }
    document.getElementById("confirm-title").textContent = title;
    document.getElementById("confirm-text").textContent = text;
    document.getElementById("confirm-ok").textContent = okLabel;
    return new Promise((resolve) => {
      dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true });
      dialog.returnValue = "";
      dialog.showModal();
      document.getElementById("confirm-cancel").focus();
    });
  }

  function fmtAge(seconds) {
    const s = Math.max(0, Math.floor(seconds));
    const pad = (n) => String(n).padStart(2, "0");
    if (s < 60) return `${s}s`;
    if (s < 3600) return `${Math.floor(s / 60)}m ${pad(s % 60)}s`;
    if (s < 86400) return `${Math.floor(s / 3600)}h ${pad(Math.floor(s % 3600 / 60))}m`;
    return `${Math.floor(s / 86400)}d ${Math.floor(s % 86400 / 3600)}h`;
  }

  function fmtBytes(n) {
    if (n === null || n === undefined) return "?";
    const units = ["B", "KB", "MB", "GB", "TB"];
    let i = 0;
    while (Math.abs(n) >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return i === 0 ? `${n} B` : `${n.toFixed(1)} ${units[i]}`;
  }

  // -- actions (every form.js-action) -------------------------------------------

  const afterAction = [];

  document.addEventListener("submit", async (event) => {
    const form = event.target.closest("form.js-action");
    if (!form) return;
    event.preventDefault();
    const verb = form.dataset.verb;
    const data = new FormData(form);
    data.delete("csrf_token");  // sent as the X-CSRF-Token header
    if (form.dataset.confirm) {
      const ok = await confirmDialog(`Destroy ${form.dataset.name}?`, form.dataset.confirm, "Destroy");
      if (!ok) return;
      data.set("confirmed", "yes");
    }
    const button = form.querySelector("button[type=submit]");
    if (button) button.classList.add("busy");
    try {
      const body = await post(form.action, data);
      toast(verb === "start" ? `VM accepted: ${body.message}` : `${verb}: ${body.message}`, true);
      if (verb === "start") {
        const name = form.querySelector('input[name="name"]');
        if (name) name.value = "";
      }
      afterAction.forEach((fn) => fn(verb, body, form));
    } catch (err) {
      toast(`${verb} failed: ${err.message}`, false);
    } finally {
      if (button) button.classList.remove("busy");
    }
  });

  // -- the dashboard --------------------------------------------------------------

  const table = document.getElementById("vm-table");
  if (table) {
    const rows = document.getElementById("vm-rows");
    const liveState = document.getElementById("live-state");
    const final = new Set(table.dataset.final.split("|"));
    let clockOffset = 0;  // server time minus ours, from the Date header
    let timer = null;

    const hide = document.getElementById("hide-ended");
    hide.checked = localStorage.getItem("vmworker.hideEnded") === "1";
    document.body.classList.toggle("hide-ended", hide.checked);
    hide.addEventListener("change", () => {
      localStorage.setItem("vmworker.hideEnded", hide.checked ? "1" : "0");
      document.body.classList.toggle("hide-ended", hide.checked);
    });

    const hidden = (name, value) => el("input", { type: "hidden", name, value });
    const actionForm = (vm, verb, label, cls, confirm) => el("form", {
      method: "post", action: `/webui/do/${verb}`, class: "inline js-action",
      "data-verb": verb, "data-name": vm.name, "data-confirm": confirm,
    }, hidden("csrf_token", csrf()), hidden("uuid", vm.uuid), hidden("back", "/webui"),
    el("button", { class: `btn small ${cls || ""}`, type: "submit", text: label }));

    function progressCell(vm) {
      const p = vm.progress;
      if (p) {
        const pct = p.total ? Math.floor(100 * p.done / p.total) : 100;
        const label = `${p.step} · ${fmtBytes(p.done)}` + (p.total ? ` of ${fmtBytes(p.total)}` : "");
        const seg = el("span", { class: "seg vms" });
        seg.style.width = `${pct}%`;
        return el("div", { class: "progress", title: p.step },
          el("div", { class: "progress-label", text: label }),
          el("div", { class: "bar thin" }, seg));
      }
      if (vm.status === "saving" && vm.save_tries && Object.keys(vm.save_tries).length) {
        const tries = Object.entries(vm.save_tries).sort().map(([k, v]) => `${k} try ${v}`).join(", ");
        return el("span", { class: "muted", text: tries });
      }
      return "";
    }

    function buildRow(vm) {
      const actions = el("div", { class: "actions" });
      if (vm.status === "running" || vm.status === "suspended") {
        actions.append(el("a", { class: "btn small primary", href: `/webui/vm/${encodeURIComponent(vm.uuid)}/console`,
                                 "data-action": "console", text: "Console" }));
      }
      if (vm.status === "running") actions.append(actionForm(vm, "suspend", "Suspend"));
      if (vm.status === "suspended") actions.append(actionForm(vm, "resume", "Resume"));
      if (!final.has(vm.status)) {
        actions.append(actionForm(vm, "destroy", "Destroy", "danger",
          `Destroy VM ${vm.name}? QEMU is killed and its disks are discarded: nothing is saved.`));
      }
      return el("tr", { "data-uuid": vm.uuid, class: final.has(vm.status) ? "ended" : "" },
        el("td", { class: "name" },
          el("a", { href: `/webui/vm/${encodeURIComponent(vm.uuid)}`, text: vm.name }),
          vm.message !== vm.status && el("div", { class: "sub", title: vm.message, text: vm.message })),
        el("td", {}, el("code", { class: "uuid", title: vm.uuid, text: vm.uuid })),
        el("td", { class: "status-cell" },
          el("span", { class: `badge s-${vm.status.replace(/ /g, "-")}`, "data-status": vm.status, text: vm.status }),
          progressCell(vm)),
        el("td", { class: "num", text: vm.cpu_count }),
        el("td", { class: "num", text: `${vm.mem_size} MB` }),
        el("td", {}, el("code", { text: vm.vnc || "—" })),
        el("td", { class: "num age", "data-created": vm.created, title: new Date(vm.created * 1000).toLocaleString() }),
        el("td", {}, actions));
    }

    function render(vms) {
      vms.sort((a, b) => b.created - a.created);
      const old = new Map([...rows.querySelectorAll("tr[data-uuid]")].map((tr) => [tr.dataset.uuid, tr]));
      const wanted = vms.map((vm) => {
        const sig = JSON.stringify([vm.status, vm.message, vm.vnc, vm.progress, vm.save_tries, vm.name]);
        const existing = old.get(vm.uuid);
        if (existing && existing.dataset.sig === sig && !existing.querySelector(".busy")) return existing;
        const row = buildRow(vm);
        row.dataset.sig = sig;
        return row;
      });
      if (!vms.length) {
        wanted.push(el("tr", { class: "empty" }, el("td", { colspan: 8, text: "No virtual machines on this host yet. Start one with the form." })));
      }
      const current = [...rows.children];
      if (current.length !== wanted.length || current.some((row, i) => row !== wanted[i])) {
        rows.replaceChildren(...wanted);
      }
      document.getElementById("vm-count").textContent = String(vms.length);
      tickAges();
    }

    function tickAges() {
      const now = (Date.now() + clockOffset) / 1000;
      for (const cell of rows.querySelectorAll("td.age[data-created]")) {
        cell.textContent = fmtAge(now - Number(cell.dataset.created));
      }
    }

    async function refresh() {
      try {
        const resp = await fetch("/vmachines/list", { headers: { "Accept": "application/json" },
                                                      credentials: "same-origin", cache: "no-store" });
        const date = resp.headers.get("Date");
        if (date) clockOffset = Date.parse(date) + 500 - Date.now();
        const body = await resp.json();
        if (!resp.ok || !body.success) throw new Error(body.message || `HTTP ${resp.status}`);
        render(body.vmachines);
        liveState.dataset.state = "ok";
        liveState.title = `refreshed ${new Date().toLocaleTimeString()} from /vmachines/list`;
      } catch (err) {
        liveState.dataset.state = "error";
        liveState.title = `refresh failed: ${err.message}`;
      }
    }

    let capacityTurn = 0;
    async function refreshCapacity() {
      const box = document.getElementById("capacity");
      if (!box) return;
      try {
        const resp = await fetch("/webui/capacity", { credentials: "same-origin", cache: "no-store" });
        if (!resp.ok || resp.redirected) return;
        const doc = new DOMParser().parseFromString(await resp.text(), "text/html");
        const fresh = doc.getElementById("capacity");
        if (fresh && fresh.innerHTML !== box.innerHTML) box.innerHTML = fresh.innerHTML;
      } catch (err) { /* the VM table's indicator shows connectivity */ }
    }

    async function loop() {
      clearTimeout(timer);
      if (document.visibilityState !== "hidden") {
        await refresh();
        if (capacityTurn++ % 2 === 0) refreshCapacity();
      }
      timer = setTimeout(loop, POLL_MS);
    }

    // Rows rendered by the server carry no signature yet: the first refresh
    // rebuilds them with the same markup.
    afterAction.push(() => loop());
    document.addEventListener("visibilitychange", () => { if (document.visibilityState === "visible") loop(); });
    setInterval(tickAges, 1000);
    loop();
  }

  // -- a VM page ------------------------------------------------------------------

  const live = document.getElementById("vm-live");
  if (live) {
    const url = live.dataset.liveUrl;
    let timer = null;

    function syncForms(status) {
      const ended = !["starting", "installing", "running", "suspended"].includes(status);
      const cdOk = status === "running" || status === "suspended";
      const set = (selector, disabled) => document.querySelectorAll(selector).forEach((n) => { n.disabled = disabled; });
      set("#save-form input:not([type=hidden]), #save-form button", ended);
      set("#cd-form input:not([type=hidden]), #cd-form button", !cdOk);
      if (!cdOk) set("#eject-form button", true);
    }

    async function refresh() {
      try {
        const resp = await fetch(url, { credentials: "same-origin", cache: "no-store" });
        if (resp.redirected || !resp.ok) return;
        const doc = new DOMParser().parseFromString(await resp.text(), "text/html");
        for (const part of doc.querySelectorAll("[data-part]")) {
          const target = document.querySelector(`[data-part="${part.dataset.part}"]`);
          if (target && target.innerHTML !== part.innerHTML) target.innerHTML = part.innerHTML;
        }
        const head = live.querySelector("[data-status]");
        if (head) syncForms(head.dataset.status);
      } catch (err) { /* keep the last view; try again */ }
    }

    async function loop() {
      clearTimeout(timer);
      if (document.visibilityState !== "hidden") await refresh();
      timer = setTimeout(loop, POLL_MS);
    }

    afterAction.push((verb) => {
      if (verb === "destroy") { loop(); return; }
      if (verb === "modify") { window.location.reload(); return; }
      loop();
    });
    document.addEventListener("visibilitychange", () => { if (document.visibilityState === "visible") loop(); });
    timer = setTimeout(loop, POLL_MS);
  }
})();
