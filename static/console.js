// The web console: redeem the page's single-use console token for the
// websocket address and a one-time VNC password, then let noVNC (Debian's
// package, served under /static/novnc/) connect straight to QEMU.
// The password lives only in this script's memory; it is never in a URL.
import RFB from "/static/novnc/core/rfb.js";

const screen = document.getElementById("console-screen");
const statusText = document.getElementById("console-status");
const cad = document.getElementById("console-cad");
const scale = document.getElementById("console-scale");
const fullscreen = document.getElementById("console-fullscreen");
const reconnect = document.getElementById("console-reconnect");
const csrf = document.querySelector('meta[name="csrf-token"]').content;

let rfb = null;

function setState(state, text) {
  statusText.dataset.state = state;
  statusText.textContent = text;
  cad.disabled = state !== "connected";
  reconnect.hidden = !(state === "disconnected" || state === "error");
}

async function redeem(token) {
  const resp = await fetch("/webui/console_open", {
    method: "POST",
    body: new URLSearchParams({ token }),
    headers: { "Accept": "application/json", "X-CSRF-Token": csrf },
    credentials: "same-origin",
    cache: "no-store",
  });
  let body;
  try {
    body = await resp.json();
  } catch (err) {
    body = { success: false, message: `the worker answered HTTP ${resp.status}` };
  }
  if (!resp.ok || !body.success) throw new Error(body.message);
  return body;
}

async function connect() {
  const token = screen.dataset.token;
  // Take the token out of the page: it is single-use anyway.
  screen.dataset.token = "";
  let grant;
  try {
    grant = await redeem(token);
  } catch (err) {
    setState("error", `Cannot open the console: ${err.message}`);
    return;
  }
  const host = grant.host || window.location.hostname;
  const url = `ws://${host.includes(":") ? `[${host}]` : host}:${grant.port}`;
  setState("connecting", `Connecting to ${grant.name}…`);
  rfb = new RFB(screen, url, {
    credentials: { password: grant.password },
    wsProtocols: ["binary"],
    shared: true,
  });
  rfb.scaleViewport = scale.checked;
  rfb.background = "#0b0f17";
  rfb.focusOnClick = true;
  rfb.addEventListener("connect", () => {
    setState("connected", `Connected to ${grant.name}`);
    rfb.focus();
  });
  rfb.addEventListener("disconnect", (event) => {
    setState("disconnected", event.detail.clean ? "Disconnected" : "Connection lost");
  });
  rfb.addEventListener("securityfailure", (event) => {
    setState("error", `VNC refused the password: ${event.detail.reason || "security failure"}`);
  });
  rfb.addEventListener("credentialsrequired", () => {
    setState("error", "VNC asked for credentials again; reconnect");
  });
  rfb.addEventListener("desktopname", (event) => {
    document.title = `Console · ${event.detail.name} · vmworker`;
  });
}

scale.addEventListener("change", () => { if (rfb) rfb.scaleViewport = scale.checked; });
cad.addEventListener("click", () => { if (rfb) rfb.sendCtrlAltDel(); });
fullscreen.addEventListener("click", () => {
  if (document.fullscreenElement) document.exitFullscreen();
  else screen.requestFullscreen().catch(() => {});
});

connect();
