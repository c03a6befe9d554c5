"""CSS and JavaScript embedded in every interactive SVG.

Behaviour follows flamegraph.pl's SVGs so users find what they know: hover
shows details, click zooms, "Reset Zoom", Ctrl-F/F3 or "Search" prompts for
a regular expression, "ic"/Ctrl-I toggles case sensitivity, and the zoom
and search state live in the URL as ``?x=&y=&s=``.

Where we differ, on purpose:

* Zoom and "Matched" use each frame's exact start/total in counts
  (``data-s``/``data-t``/``data-d``; ``data-c`` is the offset in line
  order) instead of re-reading rounded pixel
  positions, so nothing drifts after repeated zooms.
* "Matched" counts every matching frame, also those too narrow to draw:
  the SVG carries every input line (zlib, base64, in ``<metadata>``) and a
  line's count is matched when any of its frames matches.  flamegraph.pl
  only sums the frames it drew.  Decompression uses the browser's
  DecompressionStream, so the percentage appears asynchronously.
* The regular expression is tested against frame names, not against the
  whole tooltip text (flamegraph.pl also matches "samples" and percentages).

The script reads its settings from the JSON object the generator puts in
``FG``; it has no other inputs.
"""

from __future__ import annotations

__all__ = ["CSS", "SCRIPT"]

CSS = """\
text { font-family:%(font)s; font-size:%(fontsize)spx; fill:rgb(0,0,0); }
#search, #ignorecase { opacity:0.1; cursor:pointer; }
#search:hover, #search.show, #ignorecase:hover, #ignorecase.show { opacity:1; }
#subtitle { text-anchor:middle; fill:rgb(160,160,160); }
#title { text-anchor:middle; font-size:%(titlesize)spx; }
#unzoom { cursor:pointer; }
#frames > *:hover { stroke:black; stroke-width:0.5; cursor:pointer; }
.hide { display:none; }
.parent { opacity:0.5; }
"""

SCRIPT = r"""
"use strict";
var details, searchbtn, unzoombtn, matchedtxt, ignorecaseBtn, svg;
var searching = false, currentTerm = null, ignorecase = false, zoomed = null;
var lines = null, linesPromise = null, searchSeq = 0;

function init(evt) {
	details = document.getElementById("details").firstChild;
	searchbtn = document.getElementById("search");
	ignorecaseBtn = document.getElementById("ignorecase");
	unzoombtn = document.getElementById("unzoom");
	matchedtxt = document.getElementById("matched");
	svg = document.getElementsByTagName("svg")[0];
	var params = get_params();
	if (params.x && params.y) {
		var r = document.querySelector('#frames rect[x="' + params.x + '"][y="' + params.y + '"]');
		if (r) zoom(r.parentNode);
	}
	if (params.s) search(params.s);
}

window.addEventListener("click", function(e) {
	var g = find_group(e.target);
	if (g) {
		if (+g.getAttribute("data-d") === 0) unzoom();
		else zoom(g);
	}
	else if (e.target.id == "unzoom") unzoom();
	else if (e.target.id == "search") search_prompt();
	else if (e.target.id == "ignorecase") toggle_ignorecase();
}, false);
window.addEventListener("mouseover", function(e) {
	var g = find_group(e.target);
	if (g) details.nodeValue = FG.nametype + " " + g_title(g);
}, false);
window.addEventListener("mouseout", function(e) {
	if (find_group(e.target)) details.nodeValue = " ";
}, false);
window.addEventListener("keydown", function(e) {
	if (e.keyCode === 114 || (e.ctrlKey && e.keyCode === 70)) {
		e.preventDefault();
		search_prompt();
	} else if (e.ctrlKey && e.keyCode === 73) {
		e.preventDefault();
		toggle_ignorecase();
	}
}, false);

// URL state, as flamegraph.pl: ?x=<rect x>&y=<rect y>&s=<regexp>
function get_params() {
	var params = {};
	var parts = window.location.search.substr(1).split("&");
	for (var i = 0; i < parts.length; ++i) {
		var kv = parts[i].split("=");
		if (!kv[0] || !kv[1]) continue;
		params[kv[0]] = decodeURIComponent(kv[1]);
	}
	return params;
}
function set_params(params) {
	var uri = "?";
	for (var k in params) uri += k + "=" + encodeURIComponent(params[k]) + "&";
	uri = uri.slice(0, -1);
	if (uri === "") uri = window.location.href.split("?")[0];
	try { history.replaceState(null, null, uri); } catch (err) { /* opaque origins */ }
}
function update_params(changes) {
	var params = get_params();
	for (var k in changes) {
		if (changes[k] === null) delete params[k];
		else params[k] = changes[k];
	}
	set_params(params);
}

function find_group(node) {
	while (node && node.parentNode) {
		if (node.parentNode.id === "frames") return node;
		node = node.parentNode;
	}
	return null;
}
function frames() { return document.getElementById("frames").children; }
function g_title(g) { return g.getElementsByTagName("title")[0].textContent; }
function g_name(g) {
	if (+g.getAttribute("data-d") === 0) return "";
	var t = g_title(g);
	var i = t.lastIndexOf(" (");
	return i < 0 ? t : t.substring(0, i);
}
function g_rect(g) { return g.getElementsByTagName("rect")[0]; }
function g_text(g) { return g.getElementsByTagName("text")[0]; }

// Same truncation rule as the generator: chars = floor(width / glyph width).
function update_text(g) {
	var r = g_rect(g), t = g_text(g);
	var w = parseFloat(r.getAttribute("width"));
	t.setAttribute("x", (parseFloat(r.getAttribute("x")) + 3).toFixed(2));
	var name = g_name(g);
	var chars = Math.floor(w / (FG.fontsize * FG.fontwidth));
	if (chars < 3) t.textContent = "";
	else if (chars < name.length) t.textContent = name.substring(0, chars - 2) + "..";
	else t.textContent = name;
}
function save_geometry(g) {
	if (g._orig) return;
	var r = g_rect(g), t = g_text(g);
	g._orig = [r.getAttribute("x"), r.getAttribute("width"), t.getAttribute("x"), t.textContent];
}
function restore_geometry(g) {
	if (!g._orig) return;
	var r = g_rect(g), t = g_text(g);
	r.setAttribute("x", g._orig[0]);
	r.setAttribute("width", g._orig[1]);
	t.setAttribute("x", g._orig[2]);
	t.textContent = g._orig[3];
	g._orig = null;
}

function zoom(g) {
	var s = +g.getAttribute("data-s"), t = +g.getAttribute("data-t"), d = +g.getAttribute("data-d");
	if (!(t > 0)) return;
	unzoom_frames();
	var span = FG.width - 2 * FG.xpad;
	var el = frames();
	for (var i = 0; i < el.length; i++) {
		var e = el[i];
		var es = +e.getAttribute("data-s"), et = +e.getAttribute("data-t"), ed = +e.getAttribute("data-d");
		if (ed < d && es <= s && es + et >= s + t) {
			save_geometry(e);
			e.classList.add("parent");
			g_rect(e).setAttribute("x", FG.xpad.toFixed(1));
			g_rect(e).setAttribute("width", span.toFixed(1));
			update_text(e);
		} else if (ed >= d && es >= s && es + et <= s + t) {
			save_geometry(e);
			g_rect(e).setAttribute("x", (FG.xpad + (es - s) / t * span).toFixed(1));
			g_rect(e).setAttribute("width", (et / t * span).toFixed(1));
			update_text(e);
		} else {
			e.classList.add("hide");
		}
	}
	zoomed = {s: s, t: t, d: d, c: +g.getAttribute("data-c")};
	unzoombtn.classList.remove("hide");
	var r = g_rect(g);
	update_params({x: g._orig ? g._orig[0] : r.getAttribute("x"), y: r.getAttribute("y")});
	if (searching) search();
}
function unzoom_frames() {
	var el = frames();
	for (var i = 0; i < el.length; i++) {
		el[i].classList.remove("parent");
		el[i].classList.remove("hide");
		restore_geometry(el[i]);
	}
}
function unzoom() {
	unzoom_frames();
	zoomed = null;
	unzoombtn.classList.add("hide");
	update_params({x: null, y: null});
	if (searching) search();
}

function toggle_ignorecase() {
	ignorecase = !ignorecase;
	if (ignorecase) ignorecaseBtn.classList.add("show");
	else ignorecaseBtn.classList.remove("show");
	if (searching) search();
}
function search_prompt() {
	if (searching) { reset_search(); return; }
	var term = prompt("Enter a search term (regexp allowed, eg: ^ext4_)" +
		(ignorecase ? ", ignoring case" : "") +
		"\nPress Ctrl-i to toggle case sensitivity", "");
	if (term != null && term !== "") search(term);
}
function clear_highlight() {
	var el = frames();
	for (var i = 0; i < el.length; i++) {
		var r = g_rect(el[i]);
		if (r.hasAttribute("data-fill")) {
			r.setAttribute("fill", r.getAttribute("data-fill"));
			r.removeAttribute("data-fill");
		}
	}
}
function reset_search() {
	clear_highlight();
	searching = false;
	currentTerm = null;
	searchSeq++;
	searchbtn.classList.remove("show");
	searchbtn.firstChild.nodeValue = "Search";
	matchedtxt.classList.add("hide");
	matchedtxt.firstChild.nodeValue = " ";
	update_params({s: null});
}
function search(term) {
	if (term != null) currentTerm = term;
	if (currentTerm == null) return;
	var re;
	try { re = new RegExp(currentTerm, ignorecase ? "i" : ""); } catch (err) { return; }
	clear_highlight();
	var el = frames();
	for (var i = 0; i < el.length; i++) {
		var g = el[i];
		if (+g.getAttribute("data-d") === 0) continue;
		if (re.test(g_name(g))) {
			var r = g_rect(g);
			r.setAttribute("data-fill", r.getAttribute("fill"));
			r.setAttribute("fill", FG.searchcolor);
		}
	}
	searching = true;
	searchbtn.classList.add("show");
	searchbtn.firstChild.nodeValue = "Reset Search";
	update_params({s: currentTerm});
	var seq = ++searchSeq;
	matched_count(re).then(function(m) {
		if (seq !== searchSeq) return;  // a newer search superseded this one
		var lo = zoomed ? zoomed.s : 0, total = zoomed ? zoomed.t : FG.timemax;
		var pct = total > 0 ? 100 * m / total : 0;
		if (pct != 100) pct = pct.toFixed(1);
		matchedtxt.classList.remove("hide");
		matchedtxt.firstChild.nodeValue = "Matched: " + pct + "%";
	});
}

// Sum of counts of input lines (inside the zoomed frame) having a matching
// frame.  Lines are in layout order, so a frame covers a contiguous run.
function matched_count(re) {
	if (!FG.lines) return Promise.resolve(matched_drawn(re));
	return load_lines().then(function(L) {
		var ok = new Uint8Array(L.names.length);
		for (var i = 0; i < L.names.length; i++) ok[i] = re.test(L.names[i]) ? 1 : 0;
		// data-c is the frame's offset in line order (data-s is its drawn position).
		var lo = zoomed ? zoomed.c : 0, hi = zoomed ? zoomed.c + zoomed.t : Infinity;
		var m = 0, n = L.counts.length, ids = L.ids, offs = L.offs;
		for (var j = 0; j < n; j++) {
			var st = L.starts[j];
			if (st < lo || st >= hi) continue;
			for (var k = offs[j]; k < offs[j + 1]; k++) {
				if (ok[ids[k]]) { m += L.counts[j]; break; }
			}
		}
		return m;
	}, function() { return matched_drawn(re); });
}
// Fallback without embedded lines: union of the drawn matching frames.
function matched_drawn(re) {
	var el = frames(), spans = [];
	var lo = zoomed ? zoomed.s : 0, hi = zoomed ? zoomed.s + zoomed.t : Infinity;
	for (var i = 0; i < el.length; i++) {
		var g = el[i];
		if (+g.getAttribute("data-d") === 0 || !re.test(g_name(g))) continue;
		var s = Math.max(lo, +g.getAttribute("data-s"));
		var e = Math.min(hi, +g.getAttribute("data-s") + +g.getAttribute("data-t"));
		if (e > s) spans.push([s, e]);
	}
	spans.sort(function(a, b) { return a[0] - b[0] || b[1] - a[1]; });
	var m = 0, end = -Infinity;
	for (var j = 0; j < spans.length; j++) {
		var a = Math.max(spans[j][0], end);
		if (spans[j][1] > a) { m += spans[j][1] - a; end = spans[j][1]; }
	}
	return m;
}
function inflate_b64(b64) {
	var bin = atob(b64), bytes = new Uint8Array(bin.length);
	for (var i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
	var stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("deflate"));
	return new Response(stream).arrayBuffer();
}
function load_lines() {
	if (linesPromise) return linesPromise;
	var stacks = document.getElementById("fg-lines").textContent.trim();
	var counts = document.getElementById("fg-counts").textContent.trim();
	linesPromise = Promise.all([inflate_b64(stacks), inflate_b64(counts)]).then(function(res) {
		var text = new TextDecoder("utf-8").decode(res[0]);
		var cnt = new Float64Array(res[1]);
		var rows = text.length ? text.split("\n") : [];
		var index = new Map(), names = [], ids = [], offs = new Int32Array(rows.length + 1);
		var starts = new Float64Array(rows.length), t = 0;
		for (var i = 0; i < rows.length; i++) {
			offs[i] = ids.length;
			starts[i] = t;
			t += cnt[i];
			var fr = rows[i].split("\u0000");
			for (var k = 0; k < fr.length; k++) {
				var id = index.get(fr[k]);
				if (id === undefined) { id = names.length; names.push(fr[k]); index.set(fr[k], id); }
				ids.push(id);
			}
		}
		offs[rows.length] = ids.length;
		lines = {names: names, ids: Int32Array.from(ids), offs: offs, counts: cnt, starts: starts};
		return lines;
	});
	return linesPromise;
}
"""
