/* reportgen's page script (inlined; no network). Progressive enhancement only: the page shows everything
   without it. Hover a token of a feature context: its activation and the model's top predictions there
   (or, on an ablation line, the loss change). Feature index: sort by a column, filter, jump to a feature. */
(function () {
  "use strict";
  var H = null;
  function bytes(s) {
    var b = atob(s), a = new Uint8Array(b.length);
    for (var i = 0; i < b.length; i++) a[i] = b.charCodeAt(i);
    return a.buffer;
  }
  function hover() {
    if (H !== null) return H;
    var el = document.getElementById("rg-hover");
    H = false;
    if (!el) return H;
    var d = JSON.parse(el.textContent);
    H = {k: d.k, tokens: d.tokens, p: new Uint8Array(bytes(d.p)),
         ids: new ({1: Uint8Array, 2: Uint16Array, 4: Uint32Array})[d.bytes](bytes(d.ids)),
         pos: d.pos ? new Uint32Array(bytes(d.pos)) : null};
    return H;
  }
  function row(pos) {
    var h = hover();
    if (!h) return -1;
    if (!h.pos) return pos < h.ids.length / h.k ? pos : -1;
    var lo = 0, hi = h.pos.length - 1;
    while (lo <= hi) {
      var m = (lo + hi) >> 1;
      if (h.pos[m] === pos) return m;
      if (h.pos[m] < pos) lo = m + 1; else hi = m - 1;
    }
    return -1;
  }
  function split(ctx) {  // a text run holds one-character tokens: one <i> each
    if (ctx.getAttribute("data-split")) return;
    ctx.setAttribute("data-split", "1");
    [].slice.call(ctx.childNodes, 1).forEach(function (n) {
      if (n.nodeType !== 3) return;
      var frag = document.createDocumentFragment();
      Array.from(n.nodeValue).forEach(function (t) {
        var i = document.createElement("i");
        i.textContent = t;
        frag.appendChild(i);
      });
      ctx.replaceChild(frag, n);
    });
  }
  var tip = document.createElement("div");
  tip.className = "rg-tip";
  tip.hidden = true;
  document.body.appendChild(tip);
  function pct(x) { return Math.round(x * 100) + "%"; }
  document.addEventListener("mouseover", function (ev) {
    var t = ev.target;
    if (t.classList && t.classList.contains("ctx")) { split(t); return; }
    if (t.tagName !== "I" || !t.parentNode.classList || !t.parentNode.classList.contains("ctx")) { tip.hidden = true; return; }
    var ctx = t.parentNode;
    split(ctx);
    var toks = ctx.getElementsByTagName("i"), idx = [].indexOf.call(toks, t);
    var lines = [];
    if (ctx.classList.contains("abl")) {
      lines.push("loss change when ablated: " + (t.getAttribute("data-d") || "≈ 0") + " nats");
    } else {
      lines.push("activation " + (t.getAttribute("data-a") || "0"));
      var h = hover(), r = ctx.getAttribute("data-o") ? row(+ctx.getAttribute("data-o") + idx) : -1;
      if (h && r >= 0) {
        var preds = [];
        for (var j = 0; j < h.k; j++) {
          preds.push(JSON.stringify(h.tokens[h.ids[r * h.k + j]]) + " " + pct(h.p[r * h.k + j] / 255));
        }
        lines.push("model predicts: " + preds.join(", "));
      }
    }
    tip.textContent = lines.join("\n");
    tip.hidden = false;
    var b = t.getBoundingClientRect();
    tip.style.left = (window.scrollX + b.left) + "px";
    tip.style.top = (window.scrollY + b.bottom + 4) + "px";
  });
  function key(td, numeric) {
    var s = td.textContent.replace(/[,%\s]/g, "");
    return numeric ? parseFloat(s) || 0 : td.textContent;
  }
  [].forEach.call(document.querySelectorAll("table[data-sort]"), function (table) {
    var heads = table.tHead.rows[0].cells, body = table.tBodies[0], dir = {};
    [].forEach.call(heads, function (th, c) {
      th.classList.add("sortable");
      th.addEventListener("click", function () {
        var numeric = th.getAttribute("data-k") === "n", d = dir[c] = -(dir[c] || (numeric ? 1 : -1));
        var rows = [].slice.call(body.rows);
        rows.sort(function (a, b) {
          var x = key(a.cells[c], numeric), y = key(b.cells[c], numeric);
          return (x < y ? -1 : x > y ? 1 : 0) * d;
        });
        rows.forEach(function (r) { body.appendChild(r); });
      });
    });
  });
  [].forEach.call(document.querySelectorAll(".fctl"), function (ctl) {
    ctl.hidden = false;
    var table = ctl.parentNode.querySelector("table[data-sort]");
    ctl.querySelector("[data-filter]").addEventListener("input", function () {
      var q = this.value.trim();
      [].forEach.call(table.tBodies[0].rows, function (r) {
        r.hidden = q !== "" && r.cells[0].textContent !== q && r.cells[4].textContent.indexOf(q) < 0;
      });
    });
    var jump = ctl.querySelector("[data-jump]");
    jump.addEventListener("change", function () {
      var p = jump.getAttribute("data-jump"), id = this.value.trim();
      var el = document.getElementById(p + "feature-" + id) || document.getElementById(p + "f" + id);
      jump.setCustomValidity(el ? "" : "feature " + id + " does not fire on these tokens or is out of range");
      jump.reportValidity();
      if (el) { el.scrollIntoView(); el.classList.add("jumped"); location.hash = el.id; }
    });
  });
})();
