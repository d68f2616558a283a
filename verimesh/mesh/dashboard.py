# ruff: noqa: E501
"""The coordinator's dashboard: one read-only page that polls ``/v1/status`` (nothing secret)."""

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>verimesh coordinator</title>
<style>
body{font:14px system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.3em} h2{font-size:1.05em;margin-top:1.4em}
table{border-collapse:collapse;width:100%} td,th{border-bottom:1px solid #ddd;padding:3px 8px;text-align:left}
code{font:12px ui-monospace,monospace} .done,.accept,.yes{color:#070} .failed,.reject,.banned{color:#b00}
.leased,.verifying{color:#a60}
</style></head><body>
<h1>verimesh coordinator <code id="coord"></code></h1>
<p>ledger: <span id="ledger"></span> &middot; tasks: <span id="counts"></span> &middot; updated <span id="time"></span></p>
<h2>Nodes</h2><table id="nodes"><thead><tr><th>node</th><th>device</th><th>online</th><th>stake</th>
<th>slashed</th><th>score</th><th>audit level</th><th>excluded</th></tr></thead><tbody></tbody></table>
<h2>Jobs</h2><table id="jobs"><thead><tr><th>job</th><th>state</th><th>task</th><th>node</th><th>attempts</th>
<th>verdict</th><th>last outcome</th></tr></thead><tbody></tbody></table>
<h2>Recent slashes</h2><table id="slashes"><thead><tr><th>entry</th><th>time</th><th>node</th><th>job</th>
<th>amount</th><th>reason</th><th>evidence (in the ledger)</th></tr></thead><tbody></tbody></table>
<script>
const esc = s => String(s ?? "").replace(/[&<>"']/g, c => ({"&":"&amp;","<":"&lt;",">":"&gt;",'"':"&quot;","'":"&#39;"}[c]));
const short = s => s ? esc(String(s).slice(0, 19)) + "&hellip;" : "";
const token = new URLSearchParams(location.search).get("token");
async function refresh() {
  const r = await fetch("/v1/status" + (token ? "?token=" + encodeURIComponent(token) : ""));
  if (!r.ok) return;
  const s = await r.json();
  document.getElementById("coord").textContent = s.coordinator;
  document.getElementById("ledger").innerHTML = s.ledger.size + " entries, head <code>" + short(s.ledger.root) + "</code>";
  document.getElementById("counts").textContent = Object.entries(s.tasks).map(([k, v]) => k + " " + v).join(", ");
  document.getElementById("time").textContent = new Date(s.time * 1000).toLocaleTimeString();
  document.querySelector("#nodes tbody").innerHTML = s.nodes.map(n => "<tr><td><code>" + esc(n.node_id) +
    "</code></td><td>" + esc(n.device) + "</td><td class='" + (n.online ? "yes" : "") + "'>" + (n.online ? "yes" : "no") +
    "</td><td>" + esc(n.stake) + "</td><td>" + esc(n.slashed) + "</td><td>" + esc(n.score) + "</td><td>" +
    esc(n.audit_level) + "</td><td class='banned'>" + esc(n.banned) + "</td></tr>").join("");
  const cp = s.ledger.checkpoint;
  document.getElementById("ledger").innerHTML += cp ? ", checkpoint at " + esc(cp.tree_size) + " (" + esc(cp.time) + ")" : ", no checkpoint yet";
  document.querySelector("#slashes tbody").innerHTML = s.slashes.slice().reverse().map(x => "<tr><td>" + esc(x.seq) +
    "</td><td>" + esc(x.time) + "</td><td><code>" + esc(x.node_id) + "</code></td><td><code>" + short(x.job_id) +
    "</code></td><td class='banned'>" + esc(x.amount) + "</td><td>" + esc(x.reason) + "</td><td><code>" +
    short(x.evidence_digest) + "</code></td></tr>").join("") || "<tr><td colspan=7>none</td></tr>";
  document.querySelector("#jobs tbody").innerHTML = s.jobs.flatMap(j => j.tasks.map(t => {
    const last = t.history.length ? t.history[t.history.length - 1].outcome : "";
    const v = t.verdict ? t.verdict.verdict : "";
    const by = t.verdict && t.verdict.verified_by && t.verdict.verified_by !== "here" ? " (" + t.verdict.verified_by + ")" : "";
    return "<tr class='job' data-state='" + esc(j.state) + "'><td><code>" + short(j.job_id) + "</code></td><td class='" +
      esc(j.state) + "'>" + esc(j.state) + "</td><td class='" + esc(t.state) + "'>" + esc(t.position) + " " +
      esc(t.state) + "</td><td><code>" + esc(t.node_id) + "</code></td><td>" + esc(t.attempts) + "</td><td class='" +
      esc(v) + "'>" + esc(v) + esc(by) + "</td><td>" + esc(last) + "</td></tr>";
  })).join("");
}
refresh(); setInterval(refresh, 1000);
</script></body></html>
"""
