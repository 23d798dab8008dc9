// The admin UI's code (src/page/admin.html), served at /admin.js: a file of its own, so that the
// page's Content-Security-Policy allows no inline script.
"use strict";
const $ = (id) => document.getElementById(id);
const KEY = "wsgate-admin-key";
let timer = null;
let picked = null;          // the room whose presence is shown
let roomsAfter = null;      // where the next page of rooms starts
let morePages = false;      // pages past the first were asked for: the list is not refreshed
const previous = new Map(); // node -> its last status: rates are differences

// A server API call; a wrong key signs out.
async function api(method, path, body) {
  const res = await fetch(`/api/${path}`, {
    method,
    headers: { authorization: `Bearer ${sessionStorage.getItem(KEY)}`, "content-type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const answer = await res.json().catch(() => ({ error: `HTTP ${res.status}` }));
  if (res.status === 401) { signOut("the key was refused"); throw new Error(answer.error); }
  if (!res.ok) throw new Error(answer.error ?? `HTTP ${res.status}`);
  return answer;
}

function cells(row, values) {
  for (const [value, numeric] of values) {
    const td = document.createElement("td");
    td.textContent = value;
    if (numeric) td.className = "n";
    row.append(td);
  }
}

const RATES = ["messagesReceived", "deliveries", "connectionsOpened"];
const rate = (now, before, field) => ((now[field] - before[field]) * 1000 / (now.at - before.at));

async function refreshNodes() {
  const { nodes } = await api("GET", "nodes");
  let messages = 0;
  const rows = nodes.map((node) => {
    // Rates between two of the node's statuses (a node says anew at each beat, every 2 s).
    const seen = previous.get(node.node);
    let rates = seen?.rates ?? RATES.map(() => null);
    if (seen && node.at > seen.status.at) rates = RATES.map((field) => rate(node, seen.status, field));
    if (!seen || node.at > seen.status.at) previous.set(node.node, { status: node, rates });
    messages += rates[0] ?? 0;
    const tr = document.createElement("tr");
    cells(tr, [
      [node.node], [node.connections, true], [node.rooms, true],
      ...rates.map((r) => [r === null ? "…" : r.toFixed(1), true]),
      [node.shards], [node.engine], [node.version],
      [`${Math.max(0, Math.round((Date.now() - node.at) / 1000))} s ago`],
    ]);
    return tr;
  });
  $("nodes").tBodies[0].replaceChildren(...rows);
  const connections = nodes.reduce((sum, node) => sum + node.connections, 0);
  $("totals").replaceChildren(...[
    ["nodes", nodes.length], ["connections", connections], ["messages/s", messages.toFixed(1)],
  ].map(([label, value]) => {
    const span = document.createElement("span");
    const b = document.createElement("b");
    b.textContent = value;
    span.append(b, " " + label);
    return span;
  }));
}

async function refreshRooms() {
  if (morePages) return;
  const page = await api("GET", "rooms?limit=100");
  renderRooms(page, false);
}

function renderRooms(page, append) {
  const rows = page.rooms.map(({ room, members }) => {
    const tr = document.createElement("tr");
    tr.className = "pick" + (room === picked ? " picked" : "");
    tr.tabIndex = 0;
    cells(tr, [[room], [members, true]]);
    tr.onclick = tr.onkeydown = (e) => {
      if (e.type === "keydown" && e.key !== "Enter") return;
      picked = room;
      $("pubRoom").value = room;
      showPresence();
      for (const other of $("rooms").tBodies[0].rows) other.classList.toggle("picked", other === tr);
    };
    return tr;
  });
  if (append) $("rooms").tBodies[0].append(...rows);
  else $("rooms").tBodies[0].replaceChildren(...rows);
  roomsAfter = page.next ?? null;
  $("moreRooms").hidden = roomsAfter === null;
}

async function showPresence() {
  if (!picked) return;
  try {
    const page = await api("GET", `rooms/${encodeURIComponent(picked)}?limit=100`);
    $("presenceTitle").textContent = `Presence in #${picked}`;
    $("presence").tBodies[0].replaceChildren(...page.users.map((u) => {
      const tr = document.createElement("tr");
      cells(tr, [[u.userId], [u.username]]);
      return tr;
    }));
    $("presenceOut").textContent = `${page.members} connection${page.members === 1 ? "" : "s"}` + (page.next ? " (first 100 users)" : "");
  } catch (error) {
    $("presenceOut").textContent = error.message;
  }
}

async function refresh() {
  try {
    await Promise.all([refreshNodes(), refreshRooms(), showPresence()]);
  } catch (error) {
    if (sessionStorage.getItem(KEY)) $("totals").textContent = `cannot read the server API: ${error.message}`;
  }
}

function start() {
  $("login").hidden = true;
  $("app").hidden = false;
  refresh();
  clearInterval(timer);
  timer = setInterval(refresh, 2000);
}

function signOut(why) {
  sessionStorage.removeItem(KEY);
  clearInterval(timer);
  previous.clear();
  $("app").hidden = true;
  $("login").hidden = false;
  $("loginOut").textContent = why ?? "";
  $("key").focus();
}

$("loginForm").onsubmit = async (e) => {
  e.preventDefault();
  sessionStorage.setItem(KEY, $("key").value);
  $("key").value = "";
  try {
    await api("GET", "nodes");
    start();
  } catch (error) {
    if (sessionStorage.getItem(KEY)) { signOut(error.message); }
  }
};
$("signout").onclick = () => signOut();
$("moreRooms").onclick = async () => {
  try {
    morePages = true;
    renderRooms(await api("GET", `rooms?limit=100&after=${encodeURIComponent(roomsAfter)}`), true);
  } catch (error) {
    $("totals").textContent = `cannot read the rooms: ${error.message}`;
  }
};

$("publishForm").onsubmit = async (e) => {
  e.preventDefault();
  const room = $("pubRoom").value.trim();
  try {
    const answer = await api("POST", "publish", { room, as: "chat", username: $("pubName").value.trim() || "Admin", data: $("pubText").value });
    $("publishOut").className = "out";
    $("publishOut").textContent = `published to #${answer.room} at offset ${answer.offset}`;
    $("pubText").value = "";
  } catch (error) {
    $("publishOut").className = "out err";
    $("publishOut").textContent = error.message;
  }
};

$("disconnectForm").onsubmit = async (e) => {
  e.preventDefault();
  const user = $("discUser").value.trim();
  try {
    const answer = await api("POST", "disconnect", { user, code: Number($("discCode").value), reason: $("discReason").value });
    $("disconnectOut").className = "out";
    const late = answer.unanswered ? `; ${answer.unanswered} node(s) did not answer in time (repeat it)` : "";
    $("disconnectOut").textContent = `${answer.connections} connection${answer.connections === 1 ? "" : "s"} of ${user} closed on ${answer.nodes} node${answer.nodes === 1 ? "" : "s"}${late}`;
  } catch (error) {
    $("disconnectOut").className = "out err";
    $("disconnectOut").textContent = error.message;
  }
};

if (sessionStorage.getItem(KEY)) start(); else signOut();
