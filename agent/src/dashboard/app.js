// amm-agent live page: one row per watched process, updated from the
// agent's server-sent events (/events) several times a second.
"use strict";

const MiB = 1 << 20;
const rows = new Map(); // pid -> { el, parts, spark: Map(bucket -> bytes), sig }
const seen = new Set(); // feed seqs shown
const stats = { frames: 0, lastNowNs: 0, pixelDelays: [], frameTimes: [] };
window.ammLive = stats;

function fmtBytes(b) {
  if (b == null) return "–";
  if (b >= 1 << 30) return (b / (1 << 30)).toFixed(2) + " GiB";
  if (b >= MiB) return (b / MiB).toFixed(b >= 100 * MiB ? 0 : 1) + " MiB";
  if (b >= 1024) return (b / 1024).toFixed(0) + " KiB";
  return b + " B";
}

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text != null) e.textContent = text;
  return e;
}

function pctOf(b, limit) {
  return limit > 0 ? Math.max(0, Math.min(100, (100 * b) / limit)) : 0;
}

function newRow(r) {
  const e = el("div", "row");
  e.dataset.pid = r.pid;
  const who = el("div", "who");
  const line = el("div", "line");
  const name = el("span", "name");
  const badge = el("span", "badge");
  const report = el("a", "report", "report");
  report.href = "/report/" + r.pid;
  report.target = "_blank";
  report.rel = "noopener";
  report.title = "the leak-vs-hoard report of this process, from the agent's timeline";
  line.append(name, badge, report);
  const meta = el("div", "meta");
  who.append(line, meta);
  const box = el("div", "barbox");
  const bar = el("div", "bar");
  const parts = {};
  for (const k of ["managed", "unmanaged", "hoarded", "nonheap", "rss-only"]) {
    parts[k] = el("div", "seg " + k);
    parts[k].dataset.part = k;
    bar.append(parts[k]);
  }
  const spillbar = el("div", "spillbar");
  parts.spilled = el("div", "seg spilled");
  parts.spilled.dataset.part = "spilled";
  spillbar.append(parts.spilled);
  box.append(bar, spillbar);
  const marks = {};
  for (const k of ["spill", "pause", "terminate"]) {
    marks[k] = el("div", "mark " + k);
    marks[k].title = k;
    box.append(marks[k]);
  }
  const now = el("div", "now");
  now.title = "RSS now (kernel)";
  const peak = el("div", "peak");
  peak.title = "peak RSS (kernel, exact)";
  box.append(now, peak);
  const nums = el("div", "nums");
  const canvas = el("canvas", "spark");
  canvas.width = 340;
  canvas.height = 60;
  e.append(who, box, nums, canvas);
  return { el: e, name, badge, meta, box, parts, marks, now, peak, nums, canvas, spark: new Map(), sig: "" };
}

function levelText(r) {
  if (r.ended) {
    return { killed: "killed at terminate", exited: "exited", unwatched: "ended" }[r.ended.how] || r.ended.how;
  }
  return r.level;
}

function updateRow(x, r, frame) {
  const lvl = r.ended ? "ended" : r.level;
  x.el.className = "row lvl-" + r.level + (r.ended ? " ended" : "");
  x.el.dataset.level = lvl;
  x.name.textContent = r.name;
  x.name.title = r.name;
  x.badge.textContent = levelText(r);
  x.meta.textContent = "";
  x.meta.append("pid " + r.pid + " · uid " + r.uid);
  if (r.cgroup && r.cgroup !== "/") {
    const cg = el("span", "cg", r.cgroup.split("/").pop());
    cg.title = "cgroup " + r.cgroup;
    x.meta.append(" · ", cg);
  }

  const limit = r.limit;
  const s = r.split;
  const sizes = s
    ? { managed: s.managed, unmanaged: s.unmanaged_live, hoarded: s.hoarded, nonheap: s.non_heap, "rss-only": 0, spilled: s.spilled }
    : { managed: 0, unmanaged: 0, hoarded: 0, nonheap: 0, "rss-only": r.rss, spilled: 0 };
  for (const k in sizes) {
    const p = x.parts[k];
    p.style.width = pctOf(sizes[k], limit) + "%";
    p.dataset.bytes = sizes[k];
    p.title = k + ": " + fmtBytes(sizes[k]);
  }
  for (const k of ["spill", "pause", "terminate"]) {
    const v = r.levels[k];
    x.marks[k].style.display = v == null ? "none" : "";
    if (v != null) x.marks[k].style.left = pctOf(v, limit) + "%";
  }
  x.now.style.left = pctOf(r.rss, limit) + "%";
  x.now.style.display = r.ended ? "none" : "";
  x.peak.style.left = pctOf(r.peak, limit) + "%";
  x.box.dataset.limit = limit;
  x.box.dataset.rss = r.rss;
  x.box.dataset.peak = r.peak;

  const c = r.counts;
  x.nums.textContent = "";
  const top = el("div");
  top.append(el("span", "pct", pctOf(r.rss, limit).toFixed(0) + " %"), " " + fmtBytes(r.rss) + " of " + fmtBytes(limit));
  const mid = el("div", "small", "peak " + fmtBytes(r.peak) + (s ? " · spilled " + fmtBytes(s.spilled) : ""));
  const bits = [];
  if (c.spill) bits.push("spill " + c.spill);
  if (c.pause) bits.push("pause " + c.pause);
  if (c.spikes) bits.push("spikes " + c.spikes);
  if (c.kills) bits.push("killed " + c.kills);
  const low = el("div", "small", bits.length ? bits.join(" · ") : "no kernel event");
  x.nums.append(top, mid, low);

  for (const [b, v] of r.spark) x.spark.set(b, v);
  drawSpark(x, r, frame);
}

function drawSpark(x, r, frame) {
  const nowBucket = Math.floor(frame.now_ns / 1e6 / frame.bucket_ms);
  for (const b of x.spark.keys()) if (b < nowBucket - 359) x.spark.delete(b);
  // the row's own history, at least 30 s, at most the 3 minutes kept
  const keys = [...x.spark.keys()];
  const last = r.ended && keys.length ? Math.max(...keys) : nowBucket;
  const span = Math.min(359, Math.max(59, last - Math.min(last, ...keys)));
  const first = last - span;
  const sig = r.ended ? "e" + x.spark.size : nowBucket + ":" + (x.spark.get(nowBucket) || 0) + ":" + x.spark.size;
  if (sig === x.sig) return;
  x.sig = sig;
  const g = x.canvas.getContext("2d");
  const W = x.canvas.width, H = x.canvas.height;
  g.clearRect(0, 0, W, H);
  const limit = r.limit || 1;
  const y = (v) => H - 2 - (Math.min(v, limit) / limit) * (H - 4);
  g.lineWidth = 1;
  for (const [k, col] of [["spill", "rgba(255,165,0,0.9)"], ["pause", "rgba(255,0,0,0.55)"], ["terminate", "rgba(255,0,0,0.9)"]]) {
    const v = r.levels[k];
    if (v == null) continue;
    g.strokeStyle = col;
    g.setLineDash([3, 3]);
    g.beginPath(); g.moveTo(0, y(v)); g.lineTo(W, y(v)); g.stroke();
  }
  g.setLineDash([]);
  const pts = [...x.spark.entries()].sort((a, b) => a[0] - b[0]);
  if (!pts.length) return;
  const xs = (b) => ((b - first) / span) * (W - 2) + 1;
  g.beginPath();
  g.moveTo(xs(pts[0][0]), H);
  for (const [b, v] of pts) g.lineTo(xs(b), y(v));
  g.lineTo(xs(pts[pts.length - 1][0]), H);
  g.closePath();
  const c = getComputedStyle(x.el).getPropertyValue("--c").trim() || "0,0,255";
  g.fillStyle = "rgba(" + c + ",0.18)";
  g.fill();
  g.beginPath();
  pts.forEach(([b, v], i) => (i ? g.lineTo(xs(b), y(v)) : g.moveTo(xs(b), y(v))));
  g.strokeStyle = "rgba(" + c + ",0.95)";
  g.lineWidth = 2;
  g.stroke();
}

function describe(f) {
  switch (f.kind) {
    case "level":
      if (f.signalled) return ["killed at the terminate page", "crit"];
      return [f.from + " → " + f.to, f.to === "below" ? "down" : f.to === "spill" ? "up" : "crit"];
    case "spike":
      return ["spike alarm: terminate in " + (f.eta_ms != null ? f.eta_ms.toFixed(0) : "?") + " ms", "crit"];
    case "kill":
      return ["killed by the agent at terminate", "crit"];
    case "exit":
      return ["exited, peak " + fmtBytes(f.peak), ""];
    case "unwatched":
      return ["watch ended (its client left)", ""];
    default:
      return [f.kind, ""];
  }
}

function fmtMs(us) {
  return us >= 1000 ? (us / 1000).toFixed(1) + " ms" : (us / 1000).toFixed(2) + " ms";
}

function wallTime(tNs, off) {
  const d = new Date(tNs / 1e6 + off);
  return d.toLocaleTimeString([], { hour12: false }) + "." + String(d.getMilliseconds()).padStart(3, "0");
}

// Calls fn right after the browser painted the current DOM changes.
function afterPaint(fn) {
  requestAnimationFrame(() => {
    const ch = new MessageChannel();
    ch.port1.onmessage = fn;
    ch.port2.postMessage(0);
  });
}

function addFeed(frame) {
  const list = document.getElementById("feed");
  const fresh = [];
  for (const f of frame.feed) {
    if (seen.has(f.seq)) continue;
    seen.add(f.seq);
    const li = el("li");
    li.dataset.seq = f.seq;
    li.dataset.pid = f.pid;
    li.dataset.kind = f.kind;
    li.dataset.to = f.to;
    li.dataset.signalled = f.signalled;
    li.dataset.tNs = f.t_ns;
    const [what, cls] = describe(f);
    const head = el("div");
    head.append(el("span", "t", wallTime(f.t_ns, frame.wall_offset_ms) + " "), el("span", "what " + cls, what));
    const who = el("div", null, f.name + " (" + f.pid + ") · rss " + fmtBytes(f.rss));
    li.append(head, who);
    if (f.read_us != null) {
      const d = f.direct
        ? "agent read it after " + fmtMs(f.read_us) + " (the worker reads its own ring first)"
        : "delay " + fmtMs(f.read_us) + " → client " + fmtMs(f.sent_us);
      li.append(el("div", "d", d));
    }
    fresh.push([li, f]);
  }
  for (const [li] of fresh) list.prepend(li);
  while (list.children.length > 200) list.lastChild.remove();
  if (seen.size > 4000) {
    const keep = new Set([...list.children].map((c) => Number(c.dataset.seq)));
    seen.clear();
    for (const k of keep) seen.add(k);
  }
  if (fresh.length) {
    afterPaint(() => {
      const painted = performance.timeOrigin + performance.now();
      for (const [li, f] of fresh) {
        const delay = painted - (f.t_ns / 1e6 + frame.wall_offset_ms);
        li.dataset.pixelMs = delay.toFixed(3);
        stats.pixelDelays.push({ seq: f.seq, kind: f.kind, ms: delay });
      }
    });
  }
}

function apply(frame) {
  if (frame.now_ns < stats.lastNowNs) return; // an older frame, overtaken
  stats.lastNowNs = frame.now_ns;
  stats.frames += 1;
  const t = performance.now();
  stats.frameTimes.push(t);
  while (stats.frameTimes.length && stats.frameTimes[0] < t - 2000) stats.frameTimes.shift();
  const a = frame.agent;
  document.getElementById("a-watches").textContent = a.watches;
  document.getElementById("a-clients").textContent = a.clients;
  document.getElementById("a-attached").textContent = a.attached ? "attached" : "detached";
  document.getElementById("a-events").textContent = a.kernel_events;
  document.getElementById("a-dropped").textContent = a.ring_dropped;
  document.getElementById("a-rate").textContent = (stats.frameTimes.length / 2).toFixed(0);

  const box = document.getElementById("rows");
  const want = [];
  for (const r of frame.rows) {
    const key = r.ended ? "e" + r.pid + ":" + r.since_ns : String(r.pid);
    let x = rows.get(key);
    if (!x && r.ended && rows.has(String(r.pid))) {
      // the watch just ended: the same row, with its sparkline, moves on
      x = rows.get(String(r.pid));
      rows.delete(String(r.pid));
      rows.set(key, x);
    }
    if (!x) {
      x = newRow(r);
      rows.set(key, x);
    }
    updateRow(x, r, frame);
    want.push([key, x]);
  }
  const keys = new Set(want.map(([k]) => k));
  for (const [k, x] of rows) if (!keys.has(k)) { x.el.remove(); rows.delete(k); }
  want.forEach(([, x], i) => {
    if (box.children[i] !== x.el) box.insertBefore(x.el, box.children[i] || null);
  });
  document.getElementById("empty").style.display = frame.rows.length ? "none" : "";
  addFeed(frame);
}

function connect() {
  const conn = document.getElementById("conn");
  const es = new EventSource("/events");
  es.addEventListener("frame", (ev) => {
    conn.textContent = "live";
    conn.className = "conn live";
    apply(JSON.parse(ev.data));
  });
  es.onerror = () => {
    conn.textContent = "disconnected, retrying…";
    conn.className = "conn down";
  };
}

connect();
