"""HTML reports of saved runs: :func:`write_report`, behind ``genagent report``.

``write_report(folder)`` finds every saved trajectory beneath ``folder`` and, in an evaluation
folder, the per-prompt results, ``summary.json`` and ``scaling.png``. It writes a static site:
``index.html`` (every run in one filterable table) and ``runs/<id>.html`` (one run, round by
round). Pages open from ``file://`` without a server or network: CSS, script and images are
inline. All model and user text is HTML-escaped, and a Content-Security-Policy admits only the
page's own script and style (by hash), so nothing a model writes can become markup or script.
"""

from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import html
import io
import json
import logging
import math
import os
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal
from urllib.parse import quote

from genagent._progress import progress_bar
from genagent._version import __version__
from genagent.errors import ConfigurationError, TrajectoryError
from genagent.images import _atomic_write
from genagent.messages import ImagePart, TextPart
from genagent.trajectory import TRAJECTORY_FILE, ErrorInfo, Trajectory, Turn

__all__ = ["write_report"]

logger = logging.getLogger("genagent.report")

Outcome = Literal["passed", "failed", "error", "unscored"]
OUTCOMES: Final[tuple[Outcome, ...]] = ("passed", "failed", "error", "unscored")
THUMBNAIL_SIDE: Final = 96
"""Side, in pixels, of the index's thumbnails."""
_PLOT_SIDE: Final = 1600
_MAX_DECODE_PIXELS: Final = 64 * 1024 * 1024
_LONG_TEXT: Final = 400
_NAME = re.compile(r"[^A-Za-z0-9._-]+")
_REASON_KEYS: Final = ("reason", "reasons", "failed", "explanation", "rationale", "error")
_EMBEDDABLE: Final = {
    "PNG": "image/png",
    "JPEG": "image/jpeg",
    "GIF": "image/gif",
    "WEBP": "image/webp",
}

# ---------------------------------------------------------------------------- page assets

_CSS: Final = """
:root{--fg:#1d2330;--muted:#667085;--line:#d9dde5;--bg:#f6f7f9;--card:#fff;--ok:#137a3a;
--bad:#b42318;--err:#8a3ffc;--none:#667085;--accent:#3538cd}
*{box-sizing:border-box}
body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:var(--fg);
background:var(--bg)}
main{max-width:1280px;margin:0 auto;padding:16px 20px 48px}
h1{font-size:20px;margin:8px 0 4px;word-break:break-word}
h2{font-size:17px;margin:24px 0 8px}
h3{font-size:15px;margin:12px 0 8px}
.card>h2:first-child,.card>h3:first-child{margin-top:0}
a{color:var(--accent)}
nav{display:flex;gap:16px;align-items:center;font-size:13px;padding:8px 0;
border-bottom:1px solid var(--line)}
.muted{color:var(--muted)}
.card{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:12px 14px;
margin:10px 0}
.text{white-space:pre-wrap;word-break:break-word;font-family:ui-monospace,Menlo,Consolas,monospace;
font-size:13px;background:#f3f4f6;border-radius:6px;padding:6px 8px;margin:2px 0 8px}
.caption{background:#eef4ff}
.field>.label{font-size:12px;font-weight:600;color:var(--muted);text-transform:uppercase;
letter-spacing:.03em}
.badge{display:inline-block;border-radius:10px;padding:1px 8px;font-size:12px;font-weight:600;
color:#fff;background:var(--none)}
.badge.passed{background:var(--ok)}.badge.failed{background:var(--bad)}
.badge.error{background:var(--err)}.badge.unscored{background:var(--none)}
.badge.sel{background:var(--accent)}
.note{border-left:4px solid #f79009;background:#fffaeb;padding:6px 10px;margin:6px 0;
white-space:pre-wrap;word-break:break-word}
.errbox{border-left:4px solid var(--bad);background:#fef3f2;padding:6px 10px;margin:6px 0;
white-space:pre-wrap;word-break:break-word}
.broken{color:var(--bad);font-size:12px;border:1px dashed var(--bad);padding:4px 6px;
margin:4px 0;display:inline-block}
.images{display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start}
figure{margin:0;max-width:100%}
figure img{max-width:min(100%,512px);height:auto;border:1px solid var(--line);border-radius:4px;
background:#fff;display:block}
figure.selected img{outline:3px solid var(--accent)}
figcaption{font-size:12px;color:var(--muted);margin-top:2px}
table{border-collapse:collapse;background:var(--card)}
th,td{border:1px solid var(--line);padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f0f2f5;font-weight:600}
table.kv th{white-space:nowrap}
table.runs{width:100%}
table.runs td.prompt{max-width:520px;word-break:break-word}
table.runs img{width:96px;height:96px;object-fit:contain;border:1px solid var(--line);
background:#fff;display:block}
table.runs th{white-space:nowrap}
table.runs th[data-sort]{cursor:pointer;user-select:none}
table.runs th[data-sort]::after{content:" \\2195";color:var(--muted)}
.filters{display:flex;flex-wrap:wrap;gap:10px;align-items:center;margin:10px 0}
.filters input{min-width:260px}
.counts span{margin-right:14px}
.err{color:var(--bad);font-size:12px;white-space:pre-wrap;word-break:break-word}
details>summary{cursor:pointer;color:var(--muted)}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(280px,1fr));gap:8px 16px}
img.failed{display:none}
[hidden]{display:none!important}
footer{margin-top:32px;font-size:12px;color:var(--muted)}
"""

_JS: Final = """
(function () {
  "use strict";
  function broken(img) {
    if (img.dataset.loaded === "0") { return; }
    img.dataset.loaded = "0";
    img.classList.add("failed");
    var note = document.createElement("div");
    note.className = "broken";
    note.textContent = "image failed to load";
    img.insertAdjacentElement("afterend", note);
  }
  function check(img) {
    if (img.naturalWidth > 0) { img.dataset.loaded = "1"; } else { broken(img); }
  }
  Array.prototype.forEach.call(document.images, function (img) {
    if (img.complete) { check(img); return; }
    img.addEventListener("load", function () { check(img); });
    img.addEventListener("error", function () { broken(img); });
  });

  var table = document.getElementById("runs");
  if (!table) { return; }
  var body = table.tBodies[0];
  var rows = Array.prototype.slice.call(body.rows);
  var category = document.getElementById("f-category");
  var outcome = document.getElementById("f-outcome");
  var search = document.getElementById("f-q");
  var shown = document.getElementById("shown");
  function choose(select, value) {
    var known = Array.prototype.some.call(select.options, function (o) {
      return o.value === value;
    });
    if (!known) {
      var option = document.createElement("option");
      option.value = value;
      option.textContent = value;
      select.appendChild(option);
    }
    select.value = value;
  }
  function apply() {
    var c = category.value, o = outcome.value, q = search.value.trim().toLowerCase(), n = 0;
    rows.forEach(function (row) {
      var ok = (!c || row.dataset.category === c) && (!o || row.dataset.outcome === o) &&
        (!q || row.dataset.search.indexOf(q) !== -1);
      row.hidden = !ok;
      if (ok) { n += 1; }
    });
    shown.textContent = n + " of " + rows.length + " runs shown";
  }
  function fromUrl() {
    var raw = location.hash.length > 1 ? location.hash.slice(1) : location.search.slice(1);
    var params = new URLSearchParams(raw);
    choose(category, params.get("category") || "");
    choose(outcome, params.get("outcome") || "");
    search.value = params.get("q") || "";
    apply();
  }
  function toUrl() {
    var params = new URLSearchParams();
    if (category.value) { params.set("category", category.value); }
    if (outcome.value) { params.set("outcome", outcome.value); }
    if (search.value) { params.set("q", search.value); }
    var s = params.toString();
    try {
      history.replaceState(null, "", s ? "#" + s : location.pathname + location.search);
    } catch (e) { /* some browsers refuse history on file:// */ }
  }
  function changed() { apply(); toUrl(); }
  category.addEventListener("change", changed);
  outcome.addEventListener("change", changed);
  search.addEventListener("input", changed);
  window.addEventListener("hashchange", fromUrl);
  Array.prototype.forEach.call(table.tHead.querySelectorAll("th[data-sort]"), function (th) {
    th.addEventListener("click", function () {
      var key = th.dataset.sort, dir = th.dataset.dir === "asc" ? "desc" : "asc";
      th.dataset.dir = dir;
      rows.slice().sort(function (a, b) {
        var x = a.dataset[key] || "", y = b.dataset[key] || "";
        var nx = parseFloat(x), ny = parseFloat(y), r;
        if (!isNaN(nx) && !isNaN(ny)) { r = nx - ny; }
        else if (isNaN(nx) !== isNaN(ny)) { r = isNaN(nx) ? 1 : -1; }
        else { r = x.localeCompare(y); }
        return dir === "asc" ? r : -r;
      }).forEach(function (row) { body.appendChild(row); });
    });
  });
  fromUrl();
}());
"""


def _csp_hash(source: str) -> str:
    digest = hashlib.sha256(source.encode("utf-8")).digest()
    return "'sha256-" + base64.b64encode(digest).decode("ascii") + "'"


# No inline event handlers or style attributes anywhere: the page's one <style> and one <script>
# are allowed by hash, and nothing else may run or style. Images: data: URIs only, or with
# --no-embed also the files beside the report ('self'; file: for browsers whose file:// pages
# have an opaque origin).
def _csp(embed: bool) -> str:
    images = "data:" if embed else "data: 'self' file:"
    return (
        f"default-src 'none'; img-src {images}; style-src {_csp_hash(_CSS)}; "
        f"script-src {_csp_hash(_JS)}; base-uri 'none'; form-action 'none'"
    )


def _e(value: object) -> str:
    """Escape any value for HTML text or a double-quoted attribute."""
    return html.escape(str(value), quote=True)


def _page(title: str, body: str, *, embed: bool) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{_e(_csp(embed))}">\n'
        '<meta name="referrer" content="no-referrer">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{_e(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n<main>\n"
        f"{body}\n<footer>Written by genagent {_e(__version__)} on "
        f"{_e(_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'))}.</footer>\n"
        f"</main>\n<script>{_JS}</script>\n</body>\n</html>\n"
    )


# ---------------------------------------------------------------------------- formatting


def _num(value: object) -> float | None:
    """A finite number, else ``None`` (bools, strings, NaN and infinities are not scores).

    An int too large for a float (JSON allows ``1`` followed by 400 zeros) is not one either:
    ``float()`` would raise ``OverflowError``.
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _fmt_score(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def _short(value: object, limit: int = 40) -> str:
    """``value`` as short text: a huge int as its first and last digits and its length."""
    try:
        text = str(value)
    except ValueError:  # an int over Python's int-to-str digit limit
        return "an integer too long to show"
    if len(text) <= limit:
        return text
    half = (limit - 1) // 2
    return f"{text[:half]}…{text[-half:]} ({len(text)} characters)"


def _fmt_raw_score(value: object) -> str:
    """A saved score as text: 3 decimals, "—" when absent, else the value as it is."""
    number = _num(value)
    if number is not None:
        return _fmt_score(number)
    return "—" if value is None else f"{_short(value)} (not a finite number)"


def _bad_score(result: Mapping[str, Any] | None, label: str) -> str:
    """What is wrong with a result's ``score`` when it is set but not a finite number."""
    value = result.get("score") if result is not None else None
    if value is None or _num(value) is not None:
        return ""
    return f"{label} score is not a finite number: {_short(value)}"


def _fmt_s(value: object) -> str:
    number = _num(value)
    if number is None:
        return "—"
    return f"{number * 1000:.0f} ms" if abs(number) < 1 else f"{number:.2f} s"


def _rel_url(target: Path, page_dir: Path) -> str:
    """A relative URL from a page to a file: percent-encoded, so never a scheme."""
    relative = os.path.relpath(target, page_dir).replace(os.sep, "/")
    return quote(relative, safe="/")


def _field(label: str, text: object, cls: str = "") -> str:
    klass = f"text {cls}".strip()
    return (
        f'<div class="field"><div class="label">{_e(label)}</div>'
        f'<div class="{klass}">{_e(text)}</div></div>'
    )


def _json_text(value: object) -> str:
    return json.dumps(value, ensure_ascii=False, indent=1, default=str)


def _render(value: object, depth: int = 0) -> str:
    """Any JSON value as escaped HTML: tables for objects, lists inline or as rows."""
    if value is None:
        return '<span class="muted">null</span>'
    if isinstance(value, bool):
        return _e(str(value).lower())
    if isinstance(value, int | float):
        number = _num(value)
        if number is not None and isinstance(value, float):
            return _e(f"{number:.4g}")
        return _e(_short(value, _LONG_TEXT))
    if isinstance(value, str):
        if len(value) > _LONG_TEXT:
            return (
                f"<details><summary>{_e(value[:80])}…</summary>"
                f'<div class="text">{_e(value)}</div></details>'
            )
        return f'<span class="inline">{_e(value)}</span>'
    if depth > 4:
        return f'<div class="text">{_e(_json_text(value))}</div>'
    if isinstance(value, Mapping):
        if not value:
            return '<span class="muted">{}</span>'
        rows = "".join(
            f"<tr><th>{_e(k)}</th><td>{_render(v, depth + 1)}</td></tr>" for k, v in value.items()
        )
        return f'<table class="kv">{rows}</table>'
    if isinstance(value, list | tuple):
        if not value:
            return '<span class="muted">[]</span>'
        if all(not isinstance(v, Mapping | list | tuple) for v in value) and len(value) <= 50:
            if all(isinstance(v, str) for v in value) and any(len(v) > 40 for v in value):
                return (
                    "<ul>" + "".join(f"<li>{_render(v, depth + 1)}</li>" for v in value) + "</ul>"
                )
            return ", ".join(_render(v, depth + 1) for v in value)
        return "<ol>" + "".join(f"<li>{_render(v, depth + 1)}</li>" for v in value) + "</ol>"
    return _e(value)


def _judge_info(info: object) -> str:
    """The judge's ``info`` with its reasons first."""
    if not isinstance(info, Mapping) or not info:
        return ""
    first = {k: info[k] for k in _REASON_KEYS if k in info}
    rest = {k: v for k, v in info.items() if k not in first}
    return _render({**first, **rest})


# ---------------------------------------------------------------------------- images


class _Images:
    """Turns image files into ``<img>`` tags: embedded (downscaled) or linked, cached per page."""

    def __init__(self, *, embed: bool, max_side: int) -> None:
        self.embed = embed
        self.max_side = max_side
        self._cache: dict[tuple[Path, int], tuple[str | None, str | None]] = {}

    def clear(self) -> None:
        self._cache.clear()

    def tag(self, path: Path | None, page_dir: Path, *, alt: str, side: int | None = None) -> str:
        """An ``<img>`` for ``path``, or a visible note when it cannot be shown."""
        if path is None:
            return '<div class="broken">no image</div>'
        side = side or self.max_side
        key = (path, side)
        if key not in self._cache:
            self._cache[key] = self._source(path, side)
        src, problem = self._cache[key]
        if src is None:
            return (
                f'<div class="broken">{_e(problem or "image unavailable")}: {_e(path.name)}</div>'
            )
        if not self.embed:
            src = _rel_url(path, page_dir)
        lazy = ' loading="lazy"' if not self.embed and side <= THUMBNAIL_SIDE else ""
        return f'<img src="{_e(src)}" alt="{_e(alt)}"{lazy}>'

    def _source(self, path: Path, side: int) -> tuple[str | None, str | None]:
        """``(data URI or "link", None)``, or ``(None, what is wrong)``."""
        from PIL import Image

        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None, "image file missing"
        except OSError as exc:
            return None, f"image file unreadable ({exc.strerror or exc})"
        try:
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                if width * height > _MAX_DECODE_PIXELS:
                    return None, f"image too large to show ({width}x{height})"
                kind = image.format or ""
                if not self.embed:
                    image.verify()
                    return "link", None
                if kind in _EMBEDDABLE and max(width, height) <= side:
                    image.verify()  # the bytes as stored; their type is what PIL found in them
                    return _data_uri(data, _EMBEDDABLE[kind]), None
                image.draft("RGB", (side, side))
                image.seek(0)
                image.load()
                alpha = image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info
                frame = image.convert("RGBA" if alpha else "RGB")
        except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as exc:
            return None, f"not a readable image ({type(exc).__name__}: {exc})"
        frame.thumbnail((side, side))
        out = io.BytesIO()
        if alpha:
            frame.save(out, format="PNG", optimize=False)
            return _data_uri(out.getvalue(), "image/png"), None
        frame.save(out, format="JPEG", quality=85 if side > THUMBNAIL_SIDE else 80)
        return _data_uri(out.getvalue(), "image/jpeg"), None


def _data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


# ---------------------------------------------------------------------------- discovery


@dataclass
class _EvalDir:
    """An evaluation folder (or the report's source folder when it has figures)."""

    root: Path
    config: dict[str, Any] | None = None
    summary: Any = None
    problems: list[str] = field(default_factory=list)
    scaling: Path | None = None


@dataclass
class _Source:
    """One run to report, before its trajectory is read."""

    key: str
    folder: Path | None = None
    agent: dict[str, Any] | None = None
    agent_path: Path | None = None
    baseline: dict[str, Any] | None = None
    baseline_path: Path | None = None
    eval_dir: _EvalDir | None = None
    problems: list[str] = field(default_factory=list)
    slug: str = ""


@dataclass
class _Row:
    """What the index shows of one run."""

    slug: str
    prompt: str
    task_id: str
    category: str
    score: float | None
    baseline_score: float | None
    rounds: int | None
    termination: str
    outcome: Outcome
    error: str
    thumb: str
    where: str


def _read_json(path: Path) -> tuple[Any, str | None]:
    try:
        return json.loads(path.read_bytes()), None
    except FileNotFoundError:
        return None, f"{path.name} is missing"
    except OSError as exc:
        return None, f"{path.name} is unreadable ({exc.strerror or exc})"
    except (ValueError, RecursionError) as exc:
        return None, f"{path.name} is not valid JSON ({exc})"


def _inside(path: Path, root: Path) -> bool:
    try:
        path.relative_to(root)
    except ValueError:
        return False
    return True


def _discover(src: Path, out: Path) -> tuple[list[_EvalDir], list[_Source]]:
    """Every evaluation folder and run beneath ``src`` (the report's own folder excluded)."""
    trajectories: list[Path] = []
    eval_roots: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(src):
        here = Path(dirpath)
        dirnames[:] = sorted(
            d for d in dirnames if not d.startswith(".") and (here / d != out or out == src)
        )
        if TRAJECTORY_FILE in filenames:
            trajectories.append(here)
            dirnames[:] = []  # a trajectory's own folder holds only its images
            continue
        results = here / "results"
        if (
            (results / "agent").is_dir()
            or (results / "baseline").is_dir()
            or (here == src and any((here / n).is_file() for n in ("summary.json", "config.json")))
        ):
            eval_roots.append(here)

    eval_dirs: list[_EvalDir] = []
    sources: list[_Source] = []
    claimed: set[Path] = set()
    for root in eval_roots:
        ev = _EvalDir(root=root)
        eval_dirs.append(ev)
        for name in ("config.json", "summary.json"):
            if (root / name).exists():
                data, problem = _read_json(root / name)
                if problem:
                    ev.problems.append(problem)
                elif name == "config.json":
                    ev.config = data if isinstance(data, dict) else {"config": data}
                else:
                    ev.summary = data
        if (root / "scaling.png").is_file():
            ev.scaling = root / "scaling.png"
        by_stem: dict[str, _Source] = {}
        for mode in ("agent", "baseline"):
            folder = root / "results" / mode
            files = sorted(folder.glob("*.json")) if folder.is_dir() else []
            for path in files:
                source = by_stem.get(path.stem)
                if source is None:
                    key = path.relative_to(src).as_posix()
                    source = by_stem[path.stem] = _Source(key=key, eval_dir=ev)
                data, problem = _read_json(path)
                if problem is None and not isinstance(data, dict):
                    problem = f"{path.name} is not a result (the JSON is not an object)"
                if problem is not None:
                    source.problems.append(f"{mode} result {problem}")
                    conventional = root / "trajectories" / path.stem  # where the runner saves
                    if mode == "agent" and (conventional / TRAJECTORY_FILE).is_file():
                        source.folder = conventional.resolve()
                        claimed.add(source.folder)
                    continue
                assert isinstance(data, dict)
                if mode == "agent":
                    source.agent, source.agent_path = data, path
                    relative = data.get("trajectory")
                    if isinstance(relative, str) and relative:
                        folder_path = (root / relative).resolve()
                        if _inside(folder_path, src):
                            source.folder = folder_path
                            claimed.add(folder_path)
                        else:
                            source.problems.append(
                                f"the result names a trajectory outside {src}: {relative}"
                            )
                else:
                    source.baseline, source.baseline_path = data, path
        sources.extend(by_stem.values())
    for folder in trajectories:
        if folder.resolve() not in claimed:
            sources.append(_Source(key=folder.relative_to(src).as_posix(), folder=folder))
    # stable, readable, unique page names
    used: set[str] = set()
    for source in sources:
        base = _NAME.sub("-", source.key.removesuffix(".json")).strip(".-")[-60:] or "run"
        slug = f"{base}-{hashlib.sha1(source.key.encode('utf-8')).hexdigest()[:8]}"
        while slug in used:
            slug += "x"
        used.add(slug)
        source.slug = slug
    return eval_dirs, sources


# ---------------------------------------------------------------------------- one run


@dataclass
class _Run:
    """A run once read: its trajectory (if readable), results and what went wrong."""

    source: _Source
    trajectory: Trajectory | None = None
    trajectory_error: str | None = None
    notes: list[str] = field(default_factory=list)
    task: dict[str, Any] = field(default_factory=dict)

    @property
    def prompt(self) -> str:
        prompt = self.task.get("prompt")
        if isinstance(prompt, str) and prompt:
            return prompt
        return self.source.folder.name if self.source.folder is not None else self.source.key

    def text(self, key: str) -> str:
        value = self.task.get(key)
        return "" if value is None else str(value)


def _read_run(source: _Source, *, verify_images: bool) -> _Run:
    run = _Run(source=source)
    folder = source.folder
    if folder is not None:
        try:
            run.trajectory = Trajectory.load(folder, verify_images=verify_images)
        except (TrajectoryError, ValueError, OSError, RecursionError) as exc:
            first = str(exc)
            if verify_images and (folder / TRAJECTORY_FILE).is_file():
                # an image is missing or corrupt: show what the JSON holds, with a note
                try:
                    run.trajectory = Trajectory.load(folder, verify_images=False)
                    run.notes.append(f"image check failed: {first}")
                except (TrajectoryError, ValueError, OSError, RecursionError) as again:
                    run.trajectory_error = str(again)
            else:
                run.trajectory_error = first
        if run.trajectory_error is not None:
            logger.warning("report: %s", run.trajectory_error)
    if run.trajectory is not None:
        run.task = run.trajectory.task.model_dump(mode="json")
    for result in (source.agent, source.baseline):
        task = result.get("task") if result is not None else None
        if isinstance(task, dict) and not run.task:
            run.task = dict(task)
    if not run.task and folder is not None and (folder / TRAJECTORY_FILE).is_file():
        # a corrupt trajectory: keep whatever task its JSON still names
        data, _ = _read_json(folder / TRAJECTORY_FILE)
        task = data.get("task") if isinstance(data, dict) else None
        if isinstance(task, dict):
            run.task = task
    return run


def _result_error(result: Mapping[str, Any] | None, label: str = "") -> str:
    """A result's ``error`` as text, or ``""`` when it has none (``null`` or absent)."""
    error = result.get("error") if result is not None else None
    if error is None:
        return ""
    if isinstance(error, Mapping):
        text = f"{error.get('type', 'Error')}: {error.get('message', '')}"
        text = f"{text} {error['hint']}" if error.get("hint") else text
    else:
        text = _short(error, _LONG_TEXT)
    if not text.strip():
        text = f"an error with no details ({_short(json.dumps(error))})"
    return f"{label}{text}"


@dataclass
class _Scored:
    score: float | None
    baseline: float | None
    outcome: Outcome
    error: str
    rounds: int | None
    termination: str


def _assess(run: _Run, pass_threshold: float) -> _Scored:
    trajectory, agent, baseline = run.trajectory, run.source.agent, run.source.baseline
    score: float | None = None
    if agent is not None:
        score = _num(agent.get("score"))
    elif trajectory is not None and trajectory.rewards:
        score = _num(next(iter(trajectory.rewards.values())).score)
    elif baseline is not None:
        score = _num(baseline.get("score"))
    errors = [
        text
        for text in (
            *run.source.problems,
            run.trajectory_error,
            _result_error(agent),
            _bad_score(agent, "the agent result's"),
            # a baseline that failed is an error of the run too, even beside an agent result
            _result_error(baseline, "" if agent is None and trajectory is None else "baseline: "),
            _bad_score(baseline, "the baseline result's"),
            f"{trajectory.error.type}: {trajectory.error.message}"
            if trajectory is not None and trajectory.error is not None
            else "",
        )
        if text
    ]
    if not errors and agent is None and baseline is None and trajectory is None:
        errors = ["nothing readable"]
    termination = ""
    if trajectory is not None and trajectory.termination is not None:
        termination = trajectory.termination.value
    elif agent is not None and isinstance(agent.get("termination"), str):
        termination = agent["termination"]
    if termination == "error" and not errors:
        errors = ["the run ended with an error"]
    rounds: int | None = None
    if trajectory is not None:
        rounds = trajectory.num_rounds
    elif agent is not None and isinstance(agent.get("num_rounds"), int):
        rounds = agent["num_rounds"]
    elif agent is None and baseline is not None:
        rounds = 1
    outcome: Outcome
    if errors:
        outcome = "error"
    elif score is None:
        outcome = "unscored"
    else:
        outcome = "passed" if score >= pass_threshold else "failed"
    return _Scored(
        score=score,
        baseline=_num(baseline.get("score")) if baseline is not None else None,
        outcome=outcome,
        error="; ".join(errors),
        rounds=rounds,
        termination=termination,
    )


def _result_image(run: _Run) -> Path | None:
    baseline, ev = run.source.baseline, run.source.eval_dir
    relative = baseline.get("image") if baseline is not None else None
    if not isinstance(relative, str) or not relative or ev is None:
        return None
    path = (ev.root / relative).resolve()
    return path if _inside(path, ev.root.resolve()) else None


def _image_path(run: _Run, filename: str) -> Path | None:
    folder = run.source.folder
    return folder / "images" / filename if folder is not None else None


def _round_scores(result: Mapping[str, Any] | None) -> dict[int, Mapping[str, Any]]:
    rounds = result.get("rounds") if result is not None else None
    out: dict[int, Mapping[str, Any]] = {}
    if isinstance(rounds, list):
        for entry in rounds:
            if isinstance(entry, Mapping) and isinstance(entry.get("round"), int):
                out[entry["round"]] = entry
    return out


def _score_block(entry: Mapping[str, Any], label: str) -> str:
    score = _num(entry.get("score"))
    text = _fmt_score(score) if score is not None else _fmt_raw_score(entry.get("score"))
    parts = [f'<div class="field"><div class="label">{_e(label)}</div>{_e(text)}']
    if entry.get("score") is None:
        parts.append(' <span class="muted">(not scored)</span>')
    parts.append("</div>")
    components = entry.get("components")
    if isinstance(components, Mapping) and components:
        parts.append(
            f'<div class="field"><div class="label">components</div>{_render(components)}</div>'
        )
    info = _judge_info(entry.get("info"))
    if info:
        parts.append(f'<div class="field"><div class="label">judge</div>{info}</div>')
    return "".join(parts)


def _turn_html(
    run: _Run,
    turn: Turn,
    produced: set[str],
    scores: Mapping[int, Mapping[str, Any]],
    images: _Images,
    page_dir: Path,
    judged_round: int | None,
) -> str:
    outcome = turn.tool_result
    round_no = outcome.round if outcome is not None else None
    head = [f"Turn {turn.index + 1}"]
    if round_no is not None:
        head.append(f"round {round_no}")
    action = turn.action
    if action is not None and action.tool_call is not None:
        head.append(action.tool_call.name)
    elif action is not None and action.kind == "answer":
        head.append("answer")
    parts = [
        f'<section class="card turn" id="turn-{turn.index + 1}"><h3>{_e(" · ".join(head))}</h3>'
    ]
    shown = _shown_to_model(turn, produced, images, page_dir, run)
    if shown:
        parts.append(shown)
    if turn.interrupted:
        parts.append('<div class="note">The policy call did not complete (interrupted).</div>')
    if action is not None:
        if action.thought is not None:
            parts.append(_field("thought", action.thought))
        if action.judgment is not None:
            about = f" (of the round {judged_round} image)" if judged_round is not None else ""
            parts.append(_field(f"judgment{about}", action.judgment))
        if action.selected is not None:
            parts.append(_field("selected candidate", action.selected))
        call = (
            outcome.call if outcome is not None and outcome.call is not None else action.tool_call
        )
        if call is not None:
            parts.append(_field("tool", call.name))
            for key in ("caption", "instruction", "prompt"):
                value = call.arguments.get(key)
                if isinstance(value, str):
                    parts.append(_field(key, value, "caption"))
            others = {
                k: v
                for k, v in call.arguments.items()
                if k not in ("caption", "instruction", "prompt") or not isinstance(v, str)
            }
            if others:
                parts.append(
                    f'<div class="field"><div class="label">arguments</div>{_render(others)}</div>'
                )
            if outcome is not None and outcome.call is not None and action.tool_call is not None:
                parts.append(
                    '<div class="note">A hook replaced the policy\'s call; the policy asked for: '
                    f"{_e(_json_text(action.tool_call.model_dump(mode='json')))}</div>"
                )
        if action.answer is not None:
            parts.append(_field("answer", action.answer, "caption"))
    elif not turn.interrupted:
        parts.append('<div class="note">The reply could not be used (see the error below).</div>')
    if outcome is not None:
        parts.append(_outcome_html(run, turn, scores, images, page_dir))
    if turn.error is not None:
        parts.append(_error_field("error shown to the model", turn.error))
    usage = turn.usage
    stats = [
        f"policy {_fmt_s(turn.policy_latency_s)}",
        f"tool {_fmt_s(outcome.latency_s)}" if outcome is not None else "",
        f"tokens: {usage.prompt_tokens} prompt, {usage.completion_tokens} completion, "
        f"{usage.cached_tokens} cached",
        f"finish: {turn.finish_reason}" if turn.finish_reason else "",
    ]
    parts.append(f'<div class="muted">{_e(" · ".join(s for s in stats if s))}</div>')
    if turn.reply or turn.reply_suffix:
        parts.append(
            "<details><summary>raw reply</summary>"
            f'<div class="text">{_e(turn.reply)}<span class="muted">{_e(turn.reply_suffix)}</span>'
            "</div></details>"
        )
    parts.append("</section>")
    return "".join(parts)


def _shown_to_model(
    turn: Turn, produced: set[str], images: _Images, page_dir: Path, run: _Run
) -> str:
    """The messages added before this turn (prompt, tool response, error notices)."""
    if not turn.messages:
        return ""
    chunks: list[str] = []
    for message in turn.messages:
        body: list[str] = []
        for part in message.content:
            if isinstance(part, TextPart):
                body.append(f'<div class="text">{_e(part.text)}</div>')
            elif isinstance(part, ImagePart):
                ref = part.image
                if ref.sha256 in produced:
                    body.append(
                        f'<div class="muted">[image {_e(ref.sha256[:12])}: '
                        "a round's image, shown below]</div>"
                    )
                else:  # an input image (e.g. the image to edit): show it
                    path = _image_path(run, ref.filename)
                    body.append(
                        '<div class="images"><figure>'
                        f"{images.tag(path, page_dir, alt='input image')}</figure></div>"
                    )
        chunks.append(
            f'<div class="field"><div class="label">{_e(message.role)}</div>{"".join(body)}</div>'
        )
    summary = "<summary>shown to the model before this turn</summary>"
    return f"<details>{summary}{''.join(chunks)}</details>"


def _outcome_html(
    run: _Run, turn: Turn, scores: Mapping[int, Mapping[str, Any]], images: _Images, page_dir: Path
) -> str:
    trajectory = run.trajectory
    outcome = turn.tool_result
    assert trajectory is not None and outcome is not None
    parts: list[str] = []
    if outcome.images:
        figures = []
        many = len(outcome.images) > 1
        for position, index in enumerate(outcome.images):
            ref = trajectory.images[index]
            selected = position == outcome.selected
            label = [f"candidate {position + 1}" if many else "image"]
            if position < len(outcome.seeds) and outcome.seeds[position] is not None:
                label.append(f"seed {outcome.seeds[position]}")
            if outcome.scores is not None and position < len(outcome.scores):
                label.append(f"judge {_fmt_raw_score(outcome.scores[position])}")
            label.append(f"{ref.width}×{ref.height}")
            badge = ' <span class="badge sel">selected</span>' if selected and many else ""
            alt = f"round {outcome.round} {label[0]}"
            tag = images.tag(_image_path(run, ref.filename), page_dir, alt=alt)
            klass = ' class="selected"' if selected and many else ""
            figures.append(
                f"<figure{klass}>{tag}<figcaption>{_e(', '.join(label))}{badge}</figcaption>"
                "</figure>"
            )
        parts.append(f'<div class="images">{"".join(figures)}</div>')
        if many and outcome.selected_by:
            parts.append(f'<div class="muted">selected by: {_e(outcome.selected_by)}</div>')
    elif outcome.error is None:
        parts.append('<div class="muted">The tool returned no image.</div>')
    if outcome.text:
        parts.append(_field("tool text", outcome.text))
    if outcome.error is not None:
        parts.append(_error_field("tool error", outcome.error))
    if outcome.round is not None and outcome.round in scores:
        parts.append(_score_block(scores[outcome.round], f"score of round {outcome.round}"))
    if outcome.metadata:
        parts.append(
            f"<details><summary>tool metadata</summary>{_render(outcome.metadata)}</details>"
        )
    return "".join(parts)


def _run_page(
    run: _Run,
    scored: _Scored,
    images: _Images,
    page_dir: Path,
    nav: tuple[str | None, str | None],
    src: Path,
    pass_threshold: float,
) -> str:
    trajectory, source = run.trajectory, run.source
    prev_slug, next_slug = nav
    links = ['<a href="../index.html">← all runs</a>']
    if prev_slug:
        links.append(f'<a href="{_e(quote(prev_slug))}.html">previous</a>')
    if next_slug:
        links.append(f'<a href="{_e(quote(next_slug))}.html">next</a>')
    body = [f"<nav>{''.join(links)}</nav>", f"<h1>{_e(run.prompt)}</h1>"]
    facts = [f'<span class="badge {scored.outcome}">{_e(scored.outcome)}</span>']
    if run.text("id"):
        facts.append(f"id {_e(run.text('id'))}")
    if run.text("category"):
        facts.append(f"category {_e(run.text('category'))}")
    facts.append(f"score {_e(_fmt_score(scored.score))}")
    if scored.rounds is not None:
        facts.append(f"{scored.rounds} round(s)")
    if scored.termination:
        facts.append(f"termination: {_e(scored.termination)}")
    body.append(f"<p>{' · '.join(facts)}</p>")
    for note in run.notes:
        body.append(f'<div class="note">{_e(note)}</div>')
    if scored.error:
        body.append(f'<div class="errbox">{_e(scored.error)}</div>')

    # the outcome at a glance: final image, baseline image, answer, figures
    summary = ['<section class="card"><h2>Outcome</h2><div class="images">']
    final = trajectory.final_image_ref if trajectory is not None else None
    if final is not None:
        tag = images.tag(_image_path(run, final.filename), page_dir, alt="final image")
        summary.append(f"<figure>{tag}<figcaption>final image (agent)</figcaption></figure>")
    elif trajectory is not None:
        summary.append('<div class="muted">The run produced no image.</div>')
    baseline_path = _result_image(run)
    if source.baseline is not None:
        tag = (
            images.tag(baseline_path, page_dir, alt="baseline image")
            if baseline_path is not None
            else '<div class="broken">no baseline image</div>'
        )
        summary.append(
            f"<figure>{tag}<figcaption>baseline (generator alone), score "
            f"{_e(_fmt_score(scored.baseline))}</figcaption></figure>"
        )
    summary.append("</div>")
    if trajectory is not None and trajectory.answer is not None:
        summary.append(_field("final answer", trajectory.answer, "caption"))
    grid: list[str] = []
    if trajectory is not None:
        usage = trajectory.usage
        grid.append(
            _kv(
                {
                    "termination": scored.termination or "—",
                    "wall": _fmt_s(trajectory.wall_s),
                    "policy": _fmt_s(trajectory.policy_s),
                    "tool": _fmt_s(trajectory.tool_s),
                    "tokens": f"{usage.prompt_tokens} prompt, {usage.completion_tokens} "
                    f"completion, {usage.cached_tokens} cached",
                    "started": _dt.datetime.fromtimestamp(
                        trajectory.started_at, _dt.timezone.utc
                    ).strftime("%Y-%m-%d %H:%M:%S UTC")
                    if _num(trajectory.started_at) is not None and abs(trajectory.started_at) < 1e11
                    else "—",
                    "run id": trajectory.id,
                }
            )
        )
    if source.agent is not None and "wall_s" in source.agent:
        grid.append(
            _kv(
                {
                    "evaluation wall (run and scoring)": _fmt_s(source.agent.get("wall_s")),
                    "seed": source.agent.get("seed", "—"),
                }
            )
        )
    summary.append(f'<div class="grid">{"".join(grid)}</div>')
    if trajectory is not None and trajectory.rewards:
        for name, reward in trajectory.rewards.items():
            summary.append(
                f"<h3>reward {_e(name)} (final image)</h3>"
                + _score_block(reward.model_dump(mode="json"), "score")
            )
    agent_scores = _round_scores(source.agent)
    if agent_scores:
        rows = "".join(
            f"<tr><td>{k}</td><td>{_e(_fmt_raw_score(v.get('score')))}</td>"
            f"<td>{_judge_info(v.get('info'))}</td></tr>"
            for k, v in sorted(agent_scores.items())
        )
        summary.append(
            "<h3>judge score after each round (evaluation)</h3>"
            f"<table><tr><th>round</th><th>score</th><th>judge</th></tr>{rows}</table>"
        )
    if source.baseline is not None:
        for k, entry in sorted(_round_scores(source.baseline).items()):
            summary.append(f"<h3>baseline judge (round {k})</h3>" + _score_block(entry, "score"))
    summary.append("</section>")
    body.append("".join(summary))

    if trajectory is not None:
        produced = {ref.sha256 for ref in trajectory.images}
        body.append("<h2>Turns</h2>")
        if not trajectory.turns:
            body.append('<div class="muted">No policy call was made.</div>')
        judged_round: int | None = None  # a reply judges the latest image before it
        for turn in trajectory.turns:
            body.append(
                _turn_html(run, turn, produced, agent_scores, images, page_dir, judged_round)
            )
            if turn.tool_result is not None and turn.tool_result.round is not None:
                judged_round = turn.tool_result.round
        if trajectory.error is not None:
            body.append(
                f'<section class="card">{_error_field("run error", trajectory.error)}</section>'
            )
        body.append(
            f'<section class="card"><h3>End</h3>{_field("termination", scored.termination or "—")}'
            + (
                _field("final answer", trajectory.answer, "caption")
                if trajectory.answer is not None
                else ""
            )
            + "</section>"
        )

    details = []
    if run.task.get("metadata"):
        details.append(
            f"<details><summary>task metadata</summary>{_render(run.task['metadata'])}</details>"
        )
    if trajectory is not None and trajectory.metadata:
        details.append(
            "<details><summary>run metadata (policy, tools, settings)</summary>"
            f"{_render(trajectory.metadata)}</details>"
        )
    ev = source.eval_dir
    if ev is not None and ev.config:
        details.append(
            f"<details><summary>evaluation config</summary>{_render(ev.config)}</details>"
        )
    files = []
    if source.folder is not None:
        files.append(
            f'<a href="{_e(_rel_url(source.folder / TRAJECTORY_FILE, page_dir))}">'
            "trajectory.json</a>"
        )
    for label, path in (
        ("agent result", source.agent_path),
        ("baseline result", source.baseline_path),
    ):
        if path is not None:
            files.append(f'<a href="{_e(_rel_url(path, page_dir))}">{label}</a>')
    where = source.folder or source.agent_path or source.baseline_path
    if where is not None:
        shown = where.relative_to(src).as_posix() if _inside(where, src) else str(where)
        files.append(f'<span class="muted">{_e(shown)}</span>')
    details.append(f"<p>{' · '.join(files)}</p>")
    details.append(f'<p class="muted">passed: a score of at least {_e(pass_threshold)}.</p>')
    body.append(f'<section class="card"><h2>Details</h2>{"".join(details)}</section>')
    return _page(f"{run.prompt[:80]} · genagent run", "\n".join(body), embed=images.embed)


def _error_field(label: str, error: ErrorInfo) -> str:
    hint = f"\n{error.hint}" if error.hint else ""
    return (
        f'<div class="field"><div class="label">{_e(label)}</div>'
        f'<div class="errbox">{_e(error.type)}: {_e(error.message)}{_e(hint)}</div></div>'
    )


def _kv(values: Mapping[str, object]) -> str:
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in values.items())
    return f'<table class="kv">{rows}</table>'


# ---------------------------------------------------------------------------- index


def _index_page(
    title: str,
    rows: Sequence[_Row],
    eval_dirs: Sequence[_EvalDir],
    images: _Images,
    out: Path,
    src: Path,
    pass_threshold: float,
) -> str:
    counts = Counter(row.outcome for row in rows)
    scores = [row.score for row in rows if row.score is not None]
    rounds = [row.rounds for row in rows if row.rounds is not None]
    terminations = Counter(row.termination for row in rows if row.termination)
    body = [f"<h1>{_e(title)}</h1>", f'<p class="muted">{_e(src)}</p>']
    figures = [f"<span><b>{len(rows)}</b> runs</span>"]
    figures.extend(
        f'<span><span class="badge {o}">{o}</span> {counts.get(o, 0)}</span>' for o in OUTCOMES
    )
    if scores:
        figures.append(f"<span>mean score <b>{sum(scores) / len(scores):.3f}</b></span>")
    if rounds:
        figures.append(f"<span>mean rounds <b>{sum(rounds) / len(rounds):.2f}</b></span>")
    body.append(f'<p class="counts">{"".join(figures)}</p>')
    if terminations:
        body.append(
            '<p class="muted">terminations: '
            + _e(", ".join(f"{k} {v}" for k, v in sorted(terminations.items())))
            + f" · passed: score ≥ {_e(pass_threshold)}</p>"
        )
    for ev in eval_dirs:
        body.append(_eval_section(ev, images, out, src))

    categories = sorted({row.category for row in rows})
    options = "".join(f'<option value="{_e(c)}">{_e(c)}</option>' for c in categories)
    outcomes = "".join(f'<option value="{o}">{o} ({counts.get(o, 0)})</option>' for o in OUTCOMES)
    has_baseline = any(row.baseline_score is not None for row in rows)
    body.append(
        '<h2>Runs</h2><div class="filters">'
        '<label>category <select id="f-category"><option value="">all</option>'
        f"{options}</select></label>"
        '<label>outcome <select id="f-outcome"><option value="">all</option>'
        f"{outcomes}</select></label>"
        '<label>search <input id="f-q" type="search" placeholder="prompt, id, category"></label>'
        f'<span id="shown" class="muted">{len(rows)} runs</span></div>'
    )
    head = (
        '<th data-sort="order">#</th><th>image</th><th data-sort="prompt">prompt</th>'
        '<th data-sort="category">category</th><th data-sort="score">score</th>'
        + ('<th data-sort="baseline">baseline</th>' if has_baseline else "")
        + '<th data-sort="rounds">rounds</th><th data-sort="termination">termination</th>'
        '<th data-sort="outcome">outcome</th>'
    )
    lines = []
    for order, row in enumerate(rows, 1):
        search = " ".join(
            (row.prompt, row.task_id, row.category, row.termination, row.outcome, row.where)
        ).lower()
        link = f"runs/{quote(row.slug)}.html"
        error = f'<div class="err">{_e(row.error[:500])}</div>' if row.error else ""
        ident = f'<div class="muted">{_e(row.task_id)}</div>' if row.task_id else ""
        cells = [
            f"<td>{order}</td>",
            f'<td><a href="{_e(link)}">{row.thumb}</a></td>',
            f'<td class="prompt"><a href="{_e(link)}">{_e(row.prompt)}</a>{ident}{error}</td>',
            f"<td>{_e(row.category)}</td>",
            f"<td>{_e(_fmt_score(row.score))}</td>",
        ]
        if has_baseline:
            cells.append(f"<td>{_e(_fmt_score(row.baseline_score))}</td>")
        cells += [
            f"<td>{'—' if row.rounds is None else row.rounds}</td>",
            f"<td>{_e(row.termination or '—')}</td>",
            f'<td><span class="badge {row.outcome}">{row.outcome}</span></td>',
        ]
        attrs = {
            "category": row.category,
            "outcome": row.outcome,
            "search": search,
            "order": order,
            "prompt": row.prompt.lower(),
            "score": "" if row.score is None else row.score,
            "baseline": "" if row.baseline_score is None else row.baseline_score,
            "rounds": "" if row.rounds is None else row.rounds,
            "termination": row.termination,
        }
        data = "".join(f' data-{k}="{_e(v)}"' for k, v in attrs.items())
        lines.append(f'<tr class="run" id="run-{_e(row.slug)}"{data}>{"".join(cells)}</tr>')
    body.append(
        f'<table class="runs" id="runs"><thead><tr>{head}</tr></thead><tbody>\n'
        + "\n".join(lines)
        + "\n</tbody></table>"
    )
    return _page(title, "\n".join(body), embed=images.embed)


def _eval_section(ev: _EvalDir, images: _Images, out: Path, src: Path) -> str:
    name = ev.root.relative_to(src).as_posix() if ev.root != src else src.name
    kind = "Evaluation" if (ev.root / "results").is_dir() else "Summary"
    parts = [f'<section class="card"><h2>{kind}: {_e(name)}</h2>']
    for problem in ev.problems:
        parts.append(f'<div class="note">{_e(problem)}</div>')
    if ev.config:
        headline = {
            k: ev.config[k]
            for k in ("benchmark", "tool", "policy", "judge", "rounds")
            if k in ev.config
        }
        if headline:
            parts.append(_render(headline))
        parts.append(f"<details><summary>config.json</summary>{_render(ev.config)}</details>")
    summary = ev.summary
    if summary is not None:
        parts.append("<h3>Summary</h3>")
        parts.append(_summary_html(summary))
    elif (ev.root / "results").is_dir():
        parts.append(
            '<p class="muted">No summary.json yet (the evaluation may still be running).</p>'
        )
    if ev.scaling is not None:
        tag = images.tag(ev.scaling, out, alt="score by round (scaling plot)", side=_PLOT_SIDE)
        parts.append(f'<h3>Score by round</h3><div class="images"><figure>{tag}</figure></div>')
    parts.append("</section>")
    return "".join(parts)


def _per_round_html(modes: Mapping[str, Any]) -> str:
    """The aggregate after each round of each mode that has them (the scaling curve)."""
    lines = []
    for mode, figures in modes.items():
        per_round = figures.get("per_round") if isinstance(figures, Mapping) else None
        if not isinstance(per_round, list) or not per_round:
            continue
        cells = "".join(
            f"<td>{_render(r.get('overall') if isinstance(r, Mapping) else r)}</td>"
            for r in per_round
        )
        lines.append(f"<tr><th>{_e(mode)}</th>{cells}</tr>")
    if not lines:
        return ""
    longest = max(
        len(f["per_round"])
        for f in modes.values()
        if isinstance(f, Mapping) and isinstance(f.get("per_round"), list)
    )
    head = "".join(f"<th>round {k}</th>" for k in range(1, longest + 1))
    return f"<h3>After each round</h3><table><tr><th></th>{head}</tr>{''.join(lines)}</table>"


def _summary_html(summary: object) -> str:
    """``summary.json``: headline figures per mode (overall, per category), then everything."""
    parts: list[str] = []
    modes = summary.get("modes") if isinstance(summary, Mapping) else None
    if isinstance(modes, Mapping) and modes:
        finals = {m: s.get("final") for m, s in modes.items() if isinstance(s, Mapping)}
        categories: list[str] = []
        for final in finals.values():
            per = final.get("per_category") if isinstance(final, Mapping) else None
            if isinstance(per, Mapping):
                categories.extend(str(c) for c in per if str(c) not in categories)
        head = "".join(f"<th>{_e(m)}</th>" for m in finals)
        rows = [
            "<tr><th>overall</th>"
            + "".join(
                f"<td>{_render(f.get('overall')) if isinstance(f, Mapping) else '—'}</td>"
                for f in finals.values()
            )
            + "</tr>"
        ]
        for category in categories:
            cells = []
            for final in finals.values():
                per = final.get("per_category") if isinstance(final, Mapping) else None
                value = per.get(category) if isinstance(per, Mapping) else None
                cells.append(f"<td>{'—' if value is None else _render(value)}</td>")
            rows.append(f"<tr><th>{_e(category)}</th>{''.join(cells)}</tr>")
        parts.append(f"<table><tr><th></th>{head}</tr>{''.join(rows)}</table>")
        parts.append(_per_round_html(modes))
        parts.append(f"<details><summary>summary.json</summary>{_render(summary)}</details>")
    else:  # not an evaluation's summary (e.g. the demo's): everything, open
        parts.append(_render(summary))
    return "".join(parts)


# ---------------------------------------------------------------------------- entry point


def write_report(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    *,
    title: str | None = None,
    embed_images: bool = True,
    max_image_side: int = 512,
    verify_images: bool = True,
    pass_threshold: float = 0.5,
    progress: bool | None = None,
) -> Path:
    """Write an HTML report of every run saved beneath ``src``.

    ``src`` is any folder: an evaluation folder (``config.json``, ``results/``,
    ``trajectories/``, ``summary.json``, ``scaling.png``), the output of ``genagent demo --out``,
    or trajectories saved by hand, at any depth. Per-round scores and judge reasons come from an
    evaluation's results where there are some, and from the trajectory (its rewards and the
    candidates' judge scores) otherwise. A run whose trajectory cannot be read is listed with
    its error; missing or broken images are shown as a visible note. The pages need no server,
    no network and no other file when ``embed_images`` is true.

    Args:
        src: The folder to report on.
        out: Where to write (default: ``src/report``). Holds ``index.html`` and
            ``runs/<id>.html``; pages are replaced atomically, so re-running refreshes them.
        title: The index's title (default: the evaluation's benchmark, or the folder's name).
        embed_images: Embed images as ``data:`` URIs (downscaled), making each page one
            self-contained file; ``False`` links to the image files instead (smaller pages
            that only work beside the run folders).
        max_image_side: Longest side, in pixels, of embedded images on run pages.
        verify_images: Check every image file against its SHA-256 when reading trajectories
            (a mismatch is reported as a note on the run, not an error).
        pass_threshold: A run whose score is at least this has the outcome ``passed``.
        progress: Show a progress bar (default: when standard error is a terminal).

    Returns:
        The path of ``index.html``.

    Raises:
        ConfigurationError: If ``src`` is not a folder, nothing under it is a saved run or an
            evaluation result, an argument is out of range, or the report cannot be written.
    """
    root = Path(src).expanduser()
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "does not exist"
        raise ConfigurationError(
            f"{root} {what}; pass the folder of an evaluation (genagent eval --out), a demo "
            "(genagent demo --out) or saved trajectories"
        )
    root = root.resolve()
    if max_image_side < 16:
        raise ConfigurationError(f"max_image_side must be at least 16 pixels, got {max_image_side}")
    target = Path(out).expanduser().resolve() if out is not None else root / "report"
    if target.exists() and not target.is_dir():
        raise ConfigurationError(
            f"{target} exists and is not a folder; choose another output folder"
        )
    eval_dirs, sources = _discover(root, target)
    if not sources:
        raise ConfigurationError(
            f"no saved runs under {root}: no {TRAJECTORY_FILE} and no results/agent/*.json or "
            "results/baseline/*.json; pass the folder an evaluation, `genagent demo --out` or "
            "Trajectory.save wrote"
        )
    if title is None:
        benchmark = next(
            (
                ev.config.get("benchmark")
                for ev in eval_dirs
                if ev.config and ev.config.get("benchmark")
            ),
            None,
        )
        title = f"genagent report: {benchmark if isinstance(benchmark, str) else root.name}"
    images = _Images(embed=embed_images, max_side=max_image_side)
    runs_dir = target / "runs"
    rows: list[_Row] = []
    with progress_bar(len(sources), "report", enabled=progress) as advance:
        for i, source in enumerate(sources):
            run = _read_run(source, verify_images=verify_images)
            scored = _assess(run, pass_threshold)
            nav = (
                sources[i - 1].slug if i > 0 else None,
                sources[i + 1].slug if i + 1 < len(sources) else None,
            )
            page = _run_page(run, scored, images, runs_dir, nav, root, pass_threshold)
            rows.append(_row(run, scored, images, target, root))
            images.clear()
            _write(runs_dir / f"{source.slug}.html", page)
            advance()
    index = target / "index.html"
    _write(index, _index_page(title, rows, eval_dirs, images, target, root, pass_threshold))
    return index


def _row(run: _Run, scored: _Scored, images: _Images, out: Path, src: Path) -> _Row:
    trajectory, source = run.trajectory, run.source
    final = trajectory.final_image_ref if trajectory is not None else None
    if final is not None:
        path = _image_path(run, final.filename)
        thumb = images.tag(path, out, alt="final image", side=THUMBNAIL_SIDE)
    elif source.baseline is not None and source.agent is None and trajectory is None:
        thumb = images.tag(_result_image(run), out, alt="baseline image", side=THUMBNAIL_SIDE)
    else:
        thumb = '<div class="muted">no image</div>'
    where = source.folder or source.agent_path or source.baseline_path
    return _Row(
        slug=source.slug,
        prompt=run.prompt,
        task_id=run.text("id"),
        category=run.text("category") or "uncategorised",
        score=scored.score,
        baseline_score=scored.baseline,
        rounds=scored.rounds,
        termination=scored.termination,
        outcome=scored.outcome,
        error=scored.error,
        thumb=thumb,
        where=where.relative_to(src).as_posix()
        if where is not None and _inside(where, src)
        else "",
    )


def _write(path: Path, text: str) -> None:
    # lone surrogates (possible in JSON strings) cannot be UTF-8: replaced, never a crash
    try:
        _atomic_write(path, text.encode("utf-8", errors="replace"))
    except OSError as exc:
        raise ConfigurationError(
            f"cannot write {path}: {exc.strerror or exc}; choose a writable output folder"
        ) from None
