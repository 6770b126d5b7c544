"""``genagent report``: static HTML pages of saved runs, checked as text and in a real browser.

The browser checks open the pages from ``file://`` in headless Chromium. Without Chromium they
skip, unless ``CI=1`` or ``GENAGENT_REQUIRE_BROWSER=1`` is set: then a missing browser fails.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from typer.testing import CliRunner

from genagent import Agent, ConfigurationError, ScriptedPolicy, Task, Trajectory
from genagent.cli import app
from genagent.evals.report import write_report
from genagent.sim import HeuristicPolicy, SceneJudge, SceneTool, scene_tools
from genagent.sim.demo import run_demo

EVIL = "<script>document.title='pwned'</script>\"><img src=x onerror=alert(1)>"
ESCAPED_EVIL = html.escape(EVIL, quote=True)


# --------------------------------------------------------------------------- builders


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A `genagent demo --out` folder (trajectories and summary.json, no eval results)."""
    out = tmp_path_factory.mktemp("demo")
    run_demo(6, rounds=2, seed=3, out=out, progress=False)
    return out


@pytest.fixture
def demo_copy(demo: Path, tmp_path: Path) -> Path:
    """A copy of the demo folder that a test may damage."""
    copy = tmp_path / "demo"
    shutil.copytree(demo, copy)
    return copy


def evil_run(folder: Path) -> Trajectory:
    """A run whose model says markup in its thought, judgment, caption and answer."""
    caption = f"two red apples {EVIL}"
    call = {"name": "image_generation_tool", "arguments": {"caption": caption}}
    policy = ScriptedPolicy(
        [
            f"<think>{EVIL}</think><tool_call>{json.dumps(call)}</tool_call>",
            f"<think>{EVIL}</think><judge>{EVIL}</judge><answer>{EVIL}</answer>",
        ]
    )
    agent = Agent(tools=scene_tools(), policy=policy, rewards={"scene_judge": SceneJudge()})
    task = Task(
        prompt=f"two red apples {EVIL}",
        id=f"evil{EVIL}",
        category=f"cat{EVIL}",
        metadata={"note": EVIL},
    )
    trajectory = agent.run(task, seed=1)
    trajectory.save(folder)
    return trajectory


TASKS = [
    Task(prompt="a photo of two red apples", id="t-1", category="counting"),
    Task(prompt="a photo of three blue cups", id="t-2", category="counting"),
    Task(prompt="a photo of a green bowl", id="t-3", category="colors"),
]
SCORES = {"t-1": 1.0, "t-2": 0.0, "t-3": 1.0}


def eval_folder(root: Path) -> Path:
    """The layout the eval runner writes, built by hand around real simulator trajectories."""
    agent = Agent(tools=scene_tools(), policy=HeuristicPolicy(), max_rounds=2)
    generator = SceneTool()
    root.mkdir(parents=True)
    (root / "config.json").write_text(
        json.dumps({"benchmark": "toybench", "tool": "scene", "policy": "heuristic", "judge": "x"})
    )
    summary = {
        "benchmark": "toybench",
        "rule": "mean",
        "tasks": 3,
        "complete": True,
        "modes": {
            "agent": {
                "final": {"overall": 0.667, "per_category": {"counting": 0.5, "colors": 1.0}},
                "per_round": [{"overall": 0.333}, {"overall": 0.667}],
            },
            "baseline": {"final": {"overall": 0.333, "per_category": {"counting": 0.25}}},
        },
    }
    (root / "summary.json").write_text(json.dumps(summary))
    Image.new("RGB", (640, 360), "white").save(root / "scaling.png")
    for i, task in enumerate(TASKS):
        assert task.id is not None
        trajectory = agent.run(task, seed=i)
        trajectory.save(root / "trajectories" / task.id)
        rounds = [
            {
                "round": k,
                "score": SCORES[task.id] if k == 2 else 0.0,
                "components": {"apple.count": 0.0},
                "info": {"reason": f"JUDGE-REASON {task.id} round {k}"},
            }
            for k in (1, 2)
        ]
        agent_result = {
            "task": task.model_dump(mode="json"),
            "mode": "agent",
            "score": SCORES[task.id],
            "rounds": rounds,
            "termination": trajectory.termination.value if trajectory.termination else None,
            "num_rounds": trajectory.num_rounds,
            "trajectory": f"trajectories/{task.id}",
            "wall_s": 0.5,
            "error": None,
        }
        (root / "baseline").mkdir(exist_ok=True)
        (root / "baseline" / f"{task.id}.png").write_bytes(generator.generate(task.prompt, i))
        baseline_result = {
            "task": task.model_dump(mode="json"),
            "mode": "baseline",
            "score": 0.0,
            "rounds": [{"round": 1, "score": 0.0, "info": {"reason": f"BASELINE {task.id}"}}],
            "image": f"baseline/{task.id}.png",
            "wall_s": 0.1,
            "error": None,
        }
        for mode, result in (("agent", agent_result), ("baseline", baseline_result)):
            folder = root / "results" / mode
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{task.id}.json").write_text(json.dumps(result))
    return root


def page_for(index: Path, text: str) -> Path:
    """The run page the index links from the row that mentions ``text``."""
    source = index.read_text(encoding="utf-8")
    for row in re.findall(r"<tr class=\"run\".*?</tr>", source, re.S):
        if text in row:
            href = re.search(r'href="(runs/[^"]+)"', row)
            assert href is not None
            return index.parent / html.unescape(href.group(1))
    raise AssertionError(f"no row mentions {text!r}")


# --------------------------------------------------------------------------- the pages


def test_demo_folder_gets_an_index_and_a_page_per_run(demo: Path, tmp_path: Path) -> None:
    index = write_report(demo, tmp_path / "report")
    assert index == tmp_path / "report" / "index.html"
    pages = sorted((tmp_path / "report" / "runs").glob("*.html"))
    trajectories = [Trajectory.load(p.parent) for p in demo.glob("trajectories/*/trajectory.json")]
    assert len(pages) == len(trajectories) == 6
    source = index.read_text(encoding="utf-8")
    for trajectory in trajectories:
        page = page_for(index, html.escape(trajectory.prompt)).read_text(encoding="utf-8")
        for turn in trajectory.turns:  # every round's caption, every thought and judgment
            assert turn.action is not None
            if turn.action.tool_call is not None:  # caption, or an edit's instruction
                for value in turn.action.tool_call.arguments.values():
                    assert html.escape(str(value)) in page
            for text in (turn.action.thought, turn.action.judgment, turn.action.answer):
                if text:
                    assert html.escape(text) in page
        assert page.count('class="card turn"') == len(trajectory.turns)
        assert "scene_judge" in page  # the final image's reward, from the trajectory itself
    assert "6</b> runs" in source and 'id="f-category"' in source


def test_default_output_is_the_report_folder_inside_src(demo_copy: Path) -> None:
    assert write_report(demo_copy) == demo_copy / "report" / "index.html"
    # the report's own folder is not mistaken for runs on a second pass
    write_report(demo_copy)
    assert len(list((demo_copy / "report" / "runs").glob("*.html"))) == 6


def test_eval_folder_shows_round_scores_judge_reasons_and_summary(tmp_path: Path) -> None:
    root = eval_folder(tmp_path / "eval")
    index = write_report(root)
    source = index.read_text(encoding="utf-8")
    assert "genagent report: toybench" in source
    assert "0.667" in source and "counting" in source  # summary: overall and per category
    assert "round 2" in source  # the scaling table
    assert source.count("data:image/png;base64,") >= 1  # the scaling plot, embedded
    assert len(re.findall(r'<tr class="run"', source)) == 3  # results and trajectories merged
    page = page_for(index, "t-2").read_text(encoding="utf-8")
    assert "JUDGE-REASON t-2 round 1" in page and "JUDGE-REASON t-2 round 2" in page
    assert "BASELINE t-2" in page and "baseline (generator alone)" in page
    assert 'class="badge failed"' in page  # score 0.0 < 0.5
    assert 'class="badge passed"' in page_for(index, "t-1").read_text(encoding="utf-8")


def test_summary_may_be_absent_while_an_evaluation_runs(tmp_path: Path) -> None:
    root = eval_folder(tmp_path / "eval")
    (root / "summary.json").unlink()
    (root / "scaling.png").unlink()
    source = write_report(root).read_text(encoding="utf-8")
    assert "No summary.json yet" in source


def test_pages_are_self_contained_with_a_strict_policy(demo: Path, tmp_path: Path) -> None:
    index = write_report(demo, tmp_path / "r")
    for page in [index, *index.parent.glob("runs/*.html")]:
        text = page.read_text(encoding="utf-8")
        assert re.search(r"(src|href)=\"(https?:|//)", text) is None
        assert "<link" not in text and "@import" not in text
        csp = re.search(r'http-equiv="Content-Security-Policy" content="([^"]+)"', text)
        assert csp is not None
        policy = html.unescape(csp.group(1))
        assert "default-src 'none'" in policy and "img-src data:;" in policy
        assert "unsafe" not in policy and "script-src 'sha256-" in policy
        doc = _parse(text)
        assert len(doc.tags("script")) == 1 and not [a for a in doc.tags("script") if a]
        assert not [name for _, attrs in doc.elements for name in attrs if name.startswith("on")]
        assert not [attrs for _, attrs in doc.elements if "style" in attrs]


def test_model_text_is_escaped_in_the_html_source(tmp_path: Path) -> None:
    evil_run(tmp_path / "runs" / "evil")
    index = write_report(tmp_path / "runs")
    page = next((index.parent / "runs").glob("*.html"))
    for path in (index, page):
        text = path.read_text(encoding="utf-8")
        assert EVIL not in text
        assert "<img src=x" not in text and "document.title='pwned'</script>" not in text
        assert ESCAPED_EVIL in text
    text = page.read_text(encoding="utf-8")
    # thought, judgment, caption and answer are all there, as text
    assert text.count(ESCAPED_EVIL) >= 6


def test_corrupt_trajectory_is_listed_with_its_error(demo_copy: Path) -> None:
    broken = sorted((demo_copy / "trajectories").iterdir())[0]
    (broken / "trajectory.json").write_text('{"schema_version": 1, "task": {"prompt": "x"')
    index = write_report(demo_copy)
    source = index.read_text(encoding="utf-8")
    assert len(re.findall(r'<tr class="run"', source)) == 6
    row = next(r for r in re.findall(r"<tr class=\"run\".*?</tr>", source, re.S) if "error" in r)
    assert 'data-outcome="error"' in row and "not valid JSON" in row
    assert "not valid JSON" in page_for(index, "not valid JSON").read_text(encoding="utf-8")


def test_unreadable_result_file_is_listed_with_its_error(tmp_path: Path) -> None:
    root = eval_folder(tmp_path / "eval")
    (root / "results" / "agent" / "t-2.json").write_text("{truncated")
    source = write_report(root).read_text(encoding="utf-8")
    rows = re.findall(r"<tr class=\"run\".*?</tr>", source, re.S)
    assert len(rows) == 3
    broken = next(row for row in rows if "t-2" in row)
    assert 'data-outcome="error"' in broken and "t-2.json is not valid JSON" in broken
    assert sum('data-outcome="error"' in row for row in rows) == 1


def test_missing_image_is_a_visible_note_not_a_crash(demo_copy: Path) -> None:
    folder = sorted((demo_copy / "trajectories").iterdir())[0]
    trajectory = Trajectory.load(folder)
    final = trajectory.final_image_ref
    assert final is not None
    (folder / "images" / final.filename).unlink()
    index = write_report(demo_copy)
    page = page_for(index, html.escape(trajectory.prompt)).read_text(encoding="utf-8")
    assert "image check failed" in page and "image file missing" in page
    assert 'class="broken"' in page


def test_unreadable_image_is_a_visible_note(demo_copy: Path) -> None:
    folder = sorted((demo_copy / "trajectories").iterdir())[0]
    trajectory = Trajectory.load(folder)
    final = trajectory.final_image_ref
    assert final is not None
    (folder / "images" / final.filename).write_bytes(b"<svg onload=alert(1)>not an image")
    page = page_for(
        write_report(demo_copy, verify_images=False), html.escape(trajectory.prompt)
    ).read_text(encoding="utf-8")
    assert "not a readable image" in page and "<svg" not in page


def test_large_images_are_downscaled_when_embedded(tmp_path: Path) -> None:
    agent = Agent(tools=scene_tools(size=640), policy=HeuristicPolicy(), max_rounds=1)
    agent.run("a photo of a red apple", seed=0).save(tmp_path / "runs" / "big")
    index = write_report(tmp_path / "runs", max_image_side=128)
    page = next((index.parent / "runs").glob("*.html")).read_text(encoding="utf-8")
    uris = re.findall(r'src="data:(image/[a-z]+);base64,([^"]+)"', page)
    assert uris
    for mime, data in uris:
        image = Image.open(io.BytesIO(base64.b64decode(data)))
        assert mime == Image.MIME[image.format or ""]  # the type is the bytes' own
        assert max(image.size) <= 128


def test_no_embed_links_to_the_image_files(demo: Path, tmp_path: Path) -> None:
    index = write_report(demo, tmp_path / "r", embed_images=False)
    page = next((index.parent / "runs").glob("*.html"))
    sources = re.findall(r'<img src="([^"]+)"', page.read_text(encoding="utf-8"))
    assert sources and not any(s.startswith("data:") for s in sources)
    for src in sources:
        assert (page.parent / src).resolve().is_file()


def test_rerunning_replaces_the_pages_without_leftovers(demo_copy: Path) -> None:
    index = write_report(demo_copy, title="first")
    index = write_report(demo_copy, title="second")
    assert "<title>second</title>" in index.read_text(encoding="utf-8")
    leftovers = [p for p in (demo_copy / "report").rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []


def test_text_that_is_not_utf8_encodable_is_replaced(tmp_path: Path) -> None:
    root = eval_folder(tmp_path / "eval")
    path = root / "results" / "baseline" / "t-3.json"
    result = json.loads(path.read_text())
    result["rounds"][0]["info"]["reason"] = "lone \ud800 surrogate"
    path.write_text(json.dumps(result))  # json escapes it as \ud800
    page = page_for(write_report(root), "t-3").read_text(encoding="utf-8")
    assert "lone ? surrogate" in page


HUGE = "1" + "0" * 400  # a JSON int that no float holds: float() raises OverflowError


def _put_huge(path: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    """Rewrite the JSON file at ``path``, where ``edit`` sets the marker "HUGE" to the huge int."""
    data = json.loads(path.read_text())
    edit(data)
    text = json.dumps(data).replace('"HUGE"', HUGE)
    assert HUGE in text
    path.write_text(text)


def _rows(index: Path) -> dict[str, str]:
    """The index's rows by task id (t-1, t-2, t-3)."""
    rows = re.findall(r"<tr class=\"run\".*?</tr>", index.read_text(encoding="utf-8"), re.S)
    return {next(t for t in ("t-1", "t-2", "t-3") if t in row): row for row in rows}


def test_a_huge_int_in_metadata_or_a_score_is_text_not_a_crash(tmp_path: Path) -> None:
    root = eval_folder(tmp_path / "eval")
    _put_huge(  # in the task's metadata, in the trajectory the page shows
        root / "trajectories" / "t-3" / "trajectory.json",
        lambda d: d["task"].update(metadata={"big": "HUGE"}),
    )
    _put_huge(root / "results" / "agent" / "t-1.json", lambda d: d.update(score="HUGE"))
    _put_huge(  # a judge's score of one round, in the baseline result
        root / "results" / "baseline" / "t-2.json", lambda d: d["rounds"][0].update(score="HUGE")
    )
    index = write_report(root)
    rows = _rows(index)
    shown = HUGE[:19] + "…" + HUGE[-19:] + " (401 characters)"
    assert HUGE[:30] in page_for(index, "t-3").read_text(encoding="utf-8")  # metadata, as text
    assert 'data-outcome="passed"' in rows["t-3"]
    # a score that is not a finite number is an error of the run, shown as text
    assert 'data-outcome="error"' in rows["t-1"] and "score is not a finite number" in rows["t-1"]
    assert shown in rows["t-1"] and 'data-score=""' in rows["t-1"]
    page = page_for(index, "t-2").read_text(encoding="utf-8")
    assert f"{shown} (not a finite number)" in page
    assert 'data-outcome="failed"' in rows["t-2"]  # the agent's own score is fine


def test_a_nan_score_is_an_error_not_unscored(tmp_path: Path) -> None:
    root = eval_folder(tmp_path / "eval")
    path = root / "results" / "agent" / "t-1.json"
    path.write_text(path.read_text().replace('"score": 1.0, "rounds"', '"score": NaN, "rounds"'))
    row = _rows(write_report(root))["t-1"]
    assert 'data-outcome="error"' in row and "score is not a finite number: nan" in row


@pytest.mark.parametrize(
    "error",
    [
        {"type": "JudgeError", "message": "the judge timed out", "hint": "retry"},
        "the judge timed out",
    ],
)
def test_a_result_whose_error_is_set_is_an_error(tmp_path: Path, error: object) -> None:
    root = eval_folder(tmp_path / "eval")
    for mode, task_id in (("agent", "t-1"), ("baseline", "t-3")):
        path = root / "results" / mode / f"{task_id}.json"
        result = json.loads(path.read_text())
        result["error"] = error  # the score stays: an error outranks it
        path.write_text(json.dumps(result))
    rows = _rows(write_report(root))
    assert 'data-outcome="error"' in rows["t-1"] and "the judge timed out" in rows["t-1"]
    # the baseline failed beside an agent result that passed: still an error, said to be the
    # baseline's
    assert 'data-outcome="error"' in rows["t-3"] and "baseline: " in rows["t-3"]
    assert "the judge timed out" in rows["t-3"]
    assert 'data-outcome="failed"' in rows["t-2"]


def test_stray_tmp_files_of_a_killed_run_are_ignored(tmp_path: Path) -> None:
    """SIGKILL mid-write leaves ``.<name>.<hex>.tmp`` files beside results and images."""
    root = eval_folder(tmp_path / "eval")
    clean = {k: re.sub(r' id="run-[^"]*"', "", v) for k, v in _rows(write_report(root)).items()}
    for mode in ("agent", "baseline"):
        folder = root / "results" / mode
        (folder / ".t-1.json.0123abcd.tmp").write_text('{"task": {"prompt": "trunc')
        (folder / ".t-9.json.0123abcd.tmp").write_text("{")
    for run in (root / "trajectories").iterdir():
        (run / ".trajectory.json.0123abcd.tmp").write_text("{")
        images = run / "images"
        for image in list(images.iterdir()):
            (images / f".{image.name}.0123abcd.tmp").write_bytes(image.read_bytes()[:40])
        (images / f".{'0' * 64}.png.0123abcd.tmp").write_bytes(b"\x89PNG")
    index = write_report(root)
    rows = {k: re.sub(r' id="run-[^"]*"', "", v) for k, v in _rows(index).items()}
    assert rows == clean  # the same three runs, the same outcomes, no new error
    for task_id in ("t-1", "t-2", "t-3"):
        page = page_for(index, task_id).read_text(encoding="utf-8")
        assert ".tmp" not in page and "image check failed" not in page


def test_empty_or_missing_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="no saved runs"):
        write_report(tmp_path)
    with pytest.raises(ConfigurationError, match="does not exist"):
        write_report(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigurationError, match="is not a folder"):
        write_report(tmp_path / "file")


# --------------------------------------------------------------------------- the command


def test_cli_prints_the_index_path_and_url(demo: Path, tmp_path: Path) -> None:
    out = tmp_path / "site"
    result = CliRunner().invoke(app, ["report", str(demo), "--out", str(out), "--title", "T"])
    assert result.exit_code == 0, result.output
    index = out / "index.html"
    assert str(index) in result.output and index.as_uri() in result.output
    assert "<title>T</title>" in index.read_text(encoding="utf-8")


def test_cli_no_embed_writes_linked_pages(demo: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["report", str(demo), "--out", str(tmp_path), "--no-embed"])
    assert result.exit_code == 0, result.output
    assert "data:image" not in (tmp_path / "index.html").read_text(encoding="utf-8")


@pytest.mark.parametrize("make", ["missing", "empty"])
def test_cli_errors_exit_with_status_2(make: str, tmp_path: Path) -> None:
    folder = tmp_path / "runs"
    if make == "empty":
        folder.mkdir()
    result = CliRunner().invoke(app, ["report", str(folder)])
    assert result.exit_code == 2
    assert "error:" in result.output
    assert ("does not exist" if make == "missing" else "no saved runs") in result.output


# --------------------------------------------------------------------------- in a browser


class _Elements(HTMLParser):
    """Every element of a document with its attributes, and the <title> text."""

    def __init__(self) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, str | None]]] = []
        self.title = ""
        self.raw = ""
        self._in_title = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, dict(attrs)))
        self._in_title = tag == "title"

    def handle_endtag(self, tag: str) -> None:
        self._in_title = False

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title += data

    def tags(self, name: str) -> list[dict[str, str | None]]:
        return [attrs for tag, attrs in self.elements if tag == name]


def _parse(document: str) -> _Elements:
    parsed = _Elements()
    parsed.feed(document)
    parsed.raw = document
    return parsed


def _visible_rows(doc: _Elements) -> dict[str, bool]:
    return {
        str(attrs["id"]): "hidden" not in attrs
        for tag, attrs in doc.elements
        if tag == "tr" and attrs.get("id")
    }


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _browser_required() -> bool:
    return os.environ.get("GENAGENT_REQUIRE_BROWSER") == "1" or os.environ.get(
        "CI", ""
    ).lower() in {"1", "true"}


@pytest.fixture
def dom(tmp_path: Path) -> Callable[[str], _Elements]:
    """Open a URL in headless Chromium, let it run, and return the DOM it ends with."""
    exe = _chromium()
    if exe is None:
        message = "Chromium is not installed (apt-get install chromium); browser checks need it"
        if _browser_required():
            pytest.fail(message + " (CI=1 / GENAGENT_REQUIRE_BROWSER=1 makes this a failure)")
        pytest.skip(message)

    def load(url: str) -> _Elements:
        profile = tmp_path / f"chromium-profile-{len(list(tmp_path.glob('chromium-*')))}"
        result = subprocess.run(
            [
                exe,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={profile}",
                "--virtual-time-budget=5000",
                "--dump-dom",
                url,
            ],
            capture_output=True,
            text=True,
            timeout=90,
        )
        assert result.returncode == 0 and "<html" in result.stdout, result.stderr[-2000:]
        return _parse(result.stdout)

    return load


def test_model_text_stays_text_in_a_browser(
    tmp_path: Path, dom: Callable[[str], _Elements]
) -> None:
    evil_run(tmp_path / "runs" / "evil")
    index = write_report(tmp_path / "runs")
    page = next((index.parent / "runs").glob("*.html"))
    for path in (page, index):
        doc = dom(path.as_uri())
        assert doc.title != "pwned"  # the page's own title, with the prompt in it as text
        assert doc.title.startswith(("two red apples <script>", "genagent report"))
        assert len(doc.tags("script")) == 1  # the page's own, nothing injected
        assert not [img for img in doc.tags("img") if img.get("src") == "x"]
        assert not [e for _, attrs in doc.elements for e in attrs if e.startswith("on")]
        assert "&lt;script&gt;document.title='pwned'&lt;/script&gt;" in doc.raw  # as text
    doc = dom(page.as_uri())
    images = doc.tags("img")
    assert images  # the round's image and the final image render
    assert all(img.get("data-loaded") == "1" for img in images), images
    assert not [attrs for _, attrs in doc.elements if "broken" in (attrs.get("class") or "")]


def test_every_image_renders_in_a_browser(tmp_path: Path, dom: Callable[[str], _Elements]) -> None:
    index = write_report(eval_folder(tmp_path / "eval"))
    for path in (index, page_for(index, "t-1")):
        doc = dom(path.as_uri())
        images = doc.tags("img")
        assert len(images) >= 3
        assert all(img.get("data-loaded") == "1" for img in images), images
        assert not [attrs for _, attrs in doc.elements if attrs.get("class") == "broken"]


def test_a_broken_image_is_flagged_in_a_browser(
    demo_copy: Path, dom: Callable[[str], _Elements]
) -> None:
    folder = sorted((demo_copy / "trajectories").iterdir())[0]
    trajectory = Trajectory.load(folder)
    final = trajectory.final_image_ref
    assert final is not None
    index = write_report(demo_copy, embed_images=False)
    (folder / "images" / final.filename).unlink()  # gone after the report was written
    doc = dom(page_for(index, html.escape(trajectory.prompt)).as_uri())
    assert [img for img in doc.tags("img") if img.get("data-loaded") == "0"]
    assert [attrs for _, attrs in doc.elements if attrs.get("class") == "broken"]


def test_filters_apply_from_the_url_fragment(
    tmp_path: Path, dom: Callable[[str], _Elements]
) -> None:
    index = write_report(eval_folder(tmp_path / "eval"))
    everything = _visible_rows(dom(index.as_uri()))
    assert len(everything) == 3 and all(everything.values())
    visible = _visible_rows(dom(index.as_uri() + "#category=counting&outcome=failed"))
    shown = [row for row, on in visible.items() if on]
    assert len(shown) == 1 and "t-2" in shown[0]
    visible = _visible_rows(dom(index.as_uri() + "?q=green+bowl"))
    shown = [row for row, on in visible.items() if on]
    assert len(shown) == 1 and "t-3" in shown[0]
