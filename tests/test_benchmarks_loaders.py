"""Benchmark loaders (GenEval, GenEval++, WISE, custom files), their official aggregation rules,
downloads from a pinned commit checked by sha256, and the simulator's grasp of the prompts.

The benchmark files are read from ``../shared/benchmarks`` beside the repository (never copied
into the package); the tests that need them are skipped when that folder is absent. Downloads
are served by a real HTTP server on 127.0.0.1: nothing here touches the internet.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import pytest

from genagent.errors import ConfigurationError
from genagent.evals import (
    BENCHMARKS,
    GENEVAL_PP_TAGS,
    GENEVAL_TAGS,
    WISE_CATEGORIES,
    Benchmark,
    BenchmarkChecksumError,
    BenchmarkDownloadError,
    BenchmarkError,
    BenchmarkFileError,
    aggregate,
    default_cache_dir,
    load_benchmark,
    load_prompts,
    summarize_scores,
    wiscore,
)
from genagent.sim import SceneSpec, parse_caption
from genagent.tasks import Task
from tests._servers import Recorded, Reply, ScriptedServer

SHARED = Path(__file__).resolve().parents[2] / "shared" / "benchmarks"
needs_files = pytest.mark.skipif(
    not SHARED.is_dir(), reason=f"benchmark files not found at {SHARED}"
)

GENEVAL_COMMIT = "af4902f24d3ca90ebbb446dd9891a59e0f82725f"
ECHO_COMMIT = "28f36d76558e5f53b9deceda78bf025ef0d0ea24"
WISE_COMMIT = "eb51174483a5de2e34e8614cf9dfb3319ee7fcd0"
GENEVAL_PP_URL_PATH = f"/yejy53/Echo-4o/{ECHO_COMMIT}/test_scripts/Geneval++.jsonl"


@pytest.fixture(autouse=True)
def _isolated_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No test sees the user's cache or a mirror from the environment."""
    cache_root = tmp_path / "genagent-cache"
    monkeypatch.setenv("GENAGENT_CACHE", str(cache_root))
    monkeypatch.delenv("GENAGENT_BENCHMARK_MIRROR", raising=False)
    return cache_root / "benchmarks"


# --------------------------------------------------------------------------- loading


@needs_files
def test_geneval_has_553_prompts_in_6_tags_with_line_ids() -> None:
    bench = load_benchmark("geneval", SHARED)
    assert (bench.name, bench.scoring, len(bench.tasks)) == ("geneval", "strict", 553)
    assert Counter(t.category for t in bench.tasks) == {
        "position": 100, "color_attr": 100, "two_object": 99, "colors": 94,
        "single_object": 80, "counting": 80,
    }  # fmt: skip
    assert bench.categories == list(GENEVAL_TAGS)
    first, last = bench.tasks[0], bench.tasks[-1]
    assert (first.id, first.category) == ("0001", "single_object")
    assert first.prompt == "a photo of a bench"
    assert first.metadata == {
        "include": [{"class": "bench", "count": 1}],
        "benchmark": "geneval",
        "line": 1,
        "index": 0,
    }
    assert last.id == "0553" and last.metadata["line"] == 553
    assert last.metadata["index"] == 552
    counting = next(t for t in bench.tasks if t.category == "counting")
    assert counting.metadata["exclude"]  # GenEval's "not one more" constraint is kept
    official = (SHARED / "geneval" / "evaluation_metadata.jsonl").read_bytes()
    assert bench.sha256 == hashlib.sha256(official).hexdigest()


@needs_files
def test_geneval_prompts_match_the_official_generation_prompts() -> None:
    bench = load_benchmark("geneval", SHARED / "geneval")
    official = (SHARED / "geneval" / "generation_prompts.txt").read_text().splitlines()
    assert [t.prompt for t in bench.tasks] == official


@needs_files
def test_geneval_plus_plus_has_280_prompts_40_per_tag_numbered_by_line() -> None:
    bench = load_benchmark("geneval++", SHARED / "geneval_pp" / "Geneval++.jsonl")
    assert (bench.name, bench.scoring, len(bench.tasks)) == ("geneval++", "strict", 280)
    assert Counter(t.category for t in bench.tasks) == dict.fromkeys(GENEVAL_PP_TAGS, 40)
    # the official evaluator reads image <line>.jpg, line numbers of Geneval++.txt
    official = (SHARED / "geneval_pp" / "Geneval++.txt").read_text().splitlines()
    for task in bench.tasks:
        line = task.metadata["line"]
        assert official[line - 1] == task.prompt
        assert task.id == f"{line:04d}"


@needs_files
def test_geneval_long_keeps_geneval_metadata_with_long_prompts() -> None:
    short = load_benchmark("geneval", SHARED)
    long = load_benchmark("geneval-long", SHARED)
    assert len(long.tasks) == 553 and long.name == "geneval-long"
    for a, b in zip(short.tasks, long.tasks, strict=True):
        assert (a.id, a.category) == (b.id, b.category)
        assert a.metadata["include"] == b.metadata["include"]
    assert sum(len(t.prompt) for t in long.tasks) > 10 * sum(len(t.prompt) for t in short.tasks)


@needs_files
def test_wise_legacy_has_1000_prompts_in_the_official_id_ranges() -> None:
    bench = load_benchmark("wise-legacy", SHARED)
    assert (bench.name, bench.scoring, len(bench.tasks)) == ("wise-legacy", "wiscore", 1000)
    assert [t.id for t in bench.tasks] == [str(i) for i in range(1, 1001)]
    assert Counter(t.category for t in bench.tasks) == {
        "cultural": 400, "time": 167, "space": 133, "biology": 100, "physics": 100,
        "chemistry": 100,
    }  # fmt: skip
    assert bench.categories == list(WISE_CATEGORIES)
    first = bench.tasks[0]
    assert first.prompt == "Traditional food of the Mid-Autumn Festival"
    assert first.metadata["category_raw"] == "Cultural knowledge"
    assert first.metadata["subcategory"] == "Festival"
    assert first.metadata["explanation"].startswith("This refers to mooncakes")
    assert first.metadata["benchmark"] == "wise-legacy"
    assert "no licence" in bench.license


@needs_files
def test_wise_legacy_rewrite_counts_the_ecology_record_as_biology_as_the_official_script() -> None:
    by_name = load_benchmark("wise-legacy-rewrite", SHARED / "wise" / "legacy")
    by_variant = load_benchmark("wise-legacy", SHARED / "wise" / "legacy", variant="rewrite")
    assert by_name.tasks == by_variant.tasks and len(by_name.tasks) == 1000
    ecology = next(t for t in by_name.tasks if t.id == "748")
    assert ecology.metadata["category_raw"] == "Ecology"
    assert ecology.category == "biology"  # prompt_id 701-800 is BIOLOGY in Calculate.py
    assert by_name.tasks[0].prompt == "Mooncakes."


@needs_files
def test_wise_verified_has_1000_prompts_and_wise_is_its_alias() -> None:
    bench = load_benchmark("wise", SHARED)
    assert (bench.name, bench.scoring, len(bench.tasks)) == ("wise-verified", "binary", 1000)
    assert Counter(t.category for t in bench.tasks) == {
        "cultural": 400, "time": 120, "space": 120, "biology": 120, "physics": 120,
        "chemistry": 120,
    }  # fmt: skip
    assert bench.tasks == load_benchmark("wise-verified", SHARED / "wise" / "verified").tasks
    # merge.json is the union of the three files: the same tasks
    merged = load_benchmark("wise-verified", SHARED / "wise" / "verified" / "merge.json")
    assert merged.tasks == bench.tasks


@needs_files
def test_a_folder_with_only_merge_json_loads_wise_verified(tmp_path: Path) -> None:
    merge = SHARED / "wise" / "verified" / "merge.json"
    (tmp_path / "data_verified").mkdir()
    (tmp_path / "data_verified" / "merge.json").write_bytes(merge.read_bytes())
    bench = load_benchmark("wise-verified", tmp_path)
    assert len(bench.tasks) == 1000
    assert bench.sha256 == hashlib.sha256(merge.read_bytes()).hexdigest()


@needs_files
def test_a_multi_file_benchmark_hash_joins_the_file_hashes() -> None:
    bench = load_benchmark("wise-legacy", SHARED)
    names = ["cultural_common_sense", "spatio-temporal_reasoning", "natural_science"]
    lines = sorted(
        f"{hashlib.sha256((SHARED / 'wise' / 'legacy' / f'{n}.json').read_bytes()).hexdigest()}"
        f"  {n}.json\n"
        for n in names
    )
    assert bench.sha256 == hashlib.sha256("".join(lines).encode()).hexdigest()
    assert len(bench.files) == 3


@needs_files
def test_limit_keeps_the_first_tasks() -> None:
    bench = load_benchmark("geneval++", SHARED, limit=5)
    assert [t.id for t in bench.tasks] == ["0001", "0002", "0003", "0004", "0005"]
    assert bench.full_tasks == 280 and bench.full_categories == GENEVAL_PP_TAGS
    assert bench.is_partial


@needs_files
def test_every_task_knows_its_position_in_the_whole_benchmark() -> None:
    """metadata["index"]: 0-based, in the official order, the same in a slice (stable seeds)."""
    for name in ("geneval", "geneval++", "wise-legacy", "wise-verified"):
        bench = load_benchmark(name, SHARED)
        assert [t.metadata["index"] for t in bench.tasks] == list(range(len(bench.tasks)))
    wise = load_benchmark("wise-verified", SHARED)
    assert [t.id for t in wise.tasks[:3]] == ["1", "2", "3"]  # the official order: prompt_id
    pp = load_benchmark("geneval++", SHARED)
    counting = pp.subset([t for t in pp.tasks if t.category == "counting"])
    assert [t.metadata["index"] for t in counting.tasks] == list(range(240, 280))


def test_every_name_is_listed_with_a_description() -> None:
    assert set(BENCHMARKS) == {
        "geneval", "geneval-long", "geneval++", "wise", "wise-legacy", "wise-legacy-rewrite",
        "wise-verified",
    }  # fmt: skip
    assert all(BENCHMARKS.values())


def test_an_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(BenchmarkError, match=r"known: .*geneval"):
        load_benchmark("genevall")


def test_without_a_file_or_download_the_error_says_how_to_get_it(_isolated_cache: Path) -> None:
    with pytest.raises(ConfigurationError) as info:
        load_benchmark("wise-legacy")
    message = str(info.value)
    assert (
        f"https://raw.githubusercontent.com/PKU-YuanGroup/WISE/{WISE_COMMIT}/WISE_legacy/data/"
        "cultural_common_sense.json"
    ) in message
    assert "download=True" in message and "--download" in message
    assert "no licence" in message and str(_isolated_cache) in message


def test_a_missing_local_folder_names_the_files_looked_for(tmp_path: Path) -> None:
    with pytest.raises(BenchmarkError, match=r"no evaluation_metadata\.jsonl for geneval"):
        load_benchmark("geneval", tmp_path)


def test_the_default_cache_follows_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("GENAGENT_CACHE", str(tmp_path / "g"))
    assert default_cache_dir() == tmp_path / "g" / "benchmarks"
    monkeypatch.delenv("GENAGENT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert default_cache_dir() == tmp_path / "x" / "genagent" / "benchmarks"


# --------------------------------------------------------------------------- aggregation


def test_geneval_overall_is_the_mean_of_tag_means() -> None:
    scores = {
        "single_object": [1, 1, 1, 0],  # 3/4 = 0.75
        "two_object": [1, 0],  # 1/2 = 0.5
        "counting": [1, None, 0],  # the failed judgment counts 0: 1/3
        "colors": [1],  # 1.0
        "position": [0, 0, 1, 1, 1],  # 3/5 = 0.6
        "color_attr": [0, 1],  # 0.5
    }
    # (0.75 + 0.5 + 1/3 + 1.0 + 0.6 + 0.5) / 6 = 3.68333.../6 = 0.613888...
    expected = (0.75 + 0.5 + 1 / 3 + 1.0 + 0.6 + 0.5) / 6
    summary = summarize_scores("strict", scores, benchmark="geneval")
    assert summary.overall == pytest.approx(0.6138888889)
    assert summary.overall == pytest.approx(expected)
    assert aggregate("strict", scores) == pytest.approx(expected)
    # not the mean over prompts, which would be 10/17 = 0.588
    assert summary.overall != pytest.approx(10 / 17)
    assert summary.per_category["counting"].model_dump() == {
        "mean": pytest.approx(1 / 3), "n": 3, "failures": 1, "weight": pytest.approx(1 / 6),
    }  # fmt: skip
    assert (summary.n, summary.failures, summary.missing) == (17, 1, 0)
    assert "mean of task means" in summary.rule and "summary_scores.py" in summary.rule


def test_geneval_plus_plus_overall_is_the_mean_of_the_7_tag_accuracies() -> None:
    scores = {
        "color_attr": [1, 1, 0, 0],  # 0.5
        "spatial_count_attr": [1, 0, 0, 0],  # 0.25
        "color_spatial_attr": [1, 1, 1, 1],  # 1.0
        "color_count_attr": [0, 0],  # 0.0
        "multi_object_count_attr": [1, 1, 1, 0],  # 0.75
        "size_spatial_attr": [1, None],  # 0.5 (the failure counts 0)
        "counting": [1, 1, 0, 1, 1],  # 0.8
    }
    # (0.5 + 0.25 + 1.0 + 0.0 + 0.75 + 0.5 + 0.8) / 7 = 3.8 / 7 = 0.542857...
    summary = summarize_scores("strict", scores, benchmark="geneval++")
    assert summary.overall == pytest.approx(3.8 / 7)
    assert summary.overall == pytest.approx(0.5428571429)
    assert "7 tag accuracies" in summary.rule


def test_wiscore_is_the_weighted_judge_scores_over_two() -> None:
    assert wiscore(2, 2, 2) == pytest.approx(1.0)
    assert wiscore(2, 1, 0) == pytest.approx((0.7 * 2 + 0.2 * 1) / 2)  # 0.8
    with pytest.raises(ConfigurationError, match="consistency"):
        wiscore(3, 0, 0)


def test_wise_legacy_overall_weights_the_six_categories() -> None:
    scores = {
        "cultural": [wiscore(2, 2, 2), wiscore(1, 1, 1)],  # (1.0 + 0.5) / 2 = 0.75
        "time": [wiscore(2, 1, 0)],  # (1.4 + 0.2 + 0) / 2 = 0.8
        "space": [wiscore(0, 2, 2)],  # (0 + 0.4 + 0.2) / 2 = 0.3
        "biology": [None],  # judge failed: 0
        "physics": [wiscore(2, 2, 0)],  # (1.4 + 0.4) / 2 = 0.9
        "chemistry": [wiscore(1, 0, 2)],  # (0.7 + 0 + 0.2) / 2 = 0.45
    }
    # 0.4*0.75 + 0.167*0.8 + 0.133*0.3 + 0.1*0 + 0.1*0.9 + 0.1*0.45
    # = 0.3 + 0.1336 + 0.0399 + 0 + 0.09 + 0.045 = 0.6085
    summary = summarize_scores("wiscore", scores, benchmark="wise-legacy")
    assert summary.overall == pytest.approx(0.6085)
    assert summary.per_category["time"].weight == pytest.approx(0.167)
    assert summary.per_category["biology"].failures == 1
    assert summary.complete
    assert "0.167 time" in summary.rule


def test_wise_verified_overall_weights_cultural_040_and_the_rest_012() -> None:
    scores = {
        "cultural": [1, 0, 1, 1],  # 0.75
        "time": [1],  # 1.0
        "space": [0, 1],  # 0.5
        "biology": [0],  # 0.0
        "physics": [1, 1],  # 1.0
        "chemistry": [None, 1],  # 0.5
    }
    # 0.4*0.75 + 0.12*(1.0 + 0.5 + 0.0 + 1.0 + 0.5) = 0.3 + 0.12*3.0 = 0.66
    assert aggregate("binary", scores) == pytest.approx(0.66)


def test_custom_overall_is_the_plain_mean_over_prompts() -> None:
    # (1 + 0 + 0.5 + 0 [failure]) / 4 = 0.375; per category: a = 0.5, b = 0.25
    summary = summarize_scores("mean", {"a": [1, 0], "b": [0.5, None]})
    assert summary.overall == pytest.approx(0.375)
    assert summary.per_category["b"].mean == pytest.approx(0.25)
    assert summary.per_category["a"].weight == pytest.approx(0.5)


def test_wise_weights_are_renormalized_when_a_category_has_no_score() -> None:
    # only cultural (0.4) and time (0.167) scored: (0.4*1 + 0.167*0) / 0.567
    summary = summarize_scores("wiscore", {"cultural": [1.0], "time": [0.0]})
    assert summary.overall == pytest.approx(0.4 / 0.567)
    assert not summary.complete


def test_wise_scoring_rejects_a_category_outside_the_six() -> None:
    with pytest.raises(ConfigurationError, match="WISE categories"):
        aggregate("binary", {"Cultural knowledge": [1]})


def test_scores_outside_0_1_are_rejected_for_official_rules() -> None:
    with pytest.raises(ConfigurationError, match="wiscore"):
        aggregate("wiscore", {"cultural": [1.4]})
    with pytest.raises(ConfigurationError, match="finite"):
        aggregate("strict", {"colors": [float("nan")]})


@needs_files
def test_summarize_counts_failures_as_zero_and_reports_missing_prompts() -> None:
    bench = load_benchmark("wise-verified", SHARED)
    scores: dict[str, float | None] = {t.id or "": 1.0 for t in bench.tasks}
    assert bench.summarize(scores).overall == pytest.approx(1.0)
    scores["1"] = None  # a cultural prompt whose judge failed
    del scores["1000"]  # a chemistry prompt not scored yet
    summary = bench.summarize(scores)
    # cultural 399/400; overall = 0.4 * 0.9975 + 0.12 * 5 = 0.999
    assert summary.overall == pytest.approx(0.4 * 399 / 400 + 0.6)
    assert (summary.n, summary.failures, summary.missing) == (999, 1, 1)
    assert summary.per_category["chemistry"].n == 119
    assert not summary.complete


@needs_files
def test_summarize_rejects_ids_that_are_not_tasks() -> None:
    bench = load_benchmark("geneval++", SHARED)
    with pytest.raises(ConfigurationError, match="'9999'"):
        bench.summarize({"9999": 1.0})


def test_a_benchmark_rejects_duplicate_task_ids() -> None:
    tasks = [Task(prompt="a cat", id="1"), Task(prompt="a dog", id="1")]
    with pytest.raises(ConfigurationError, match="duplicate task id '1'"):
        Benchmark(name="custom", tasks=tasks, source="x", sha256=None, scoring="mean")


# --------------------------------------------------------------------------- downloads


def _serve_file(server: ScriptedServer, url_path: str, body: bytes, *replies: Reply) -> None:
    server.script("GET", url_path, *replies, Reply(body=body))


@needs_files
def test_download_fetches_the_pinned_file_verifies_it_and_caches_it(
    _isolated_cache: Path, tmp_path: Path
) -> None:
    body = (SHARED / "geneval_pp" / "Geneval++.jsonl").read_bytes()
    with ScriptedServer() as server:
        _serve_file(server, GENEVAL_PP_URL_PATH, body)
        bench = load_benchmark("geneval++", download=True, mirror=server.url)
        assert [r.path for r in server.requests] == [GENEVAL_PP_URL_PATH]
    assert len(bench.tasks) == 280
    assert bench.source == (
        f"https://raw.githubusercontent.com/yejy53/Echo-4o/{ECHO_COMMIT}/test_scripts/Geneval++.jsonl"
    )
    cached = [p for p in _isolated_cache.rglob("*") if p.is_file()]
    assert len(cached) == 1 and cached[0].read_bytes() == body
    # later loads use the cache, with no server and no download
    again = load_benchmark("geneval++")
    assert again.tasks == bench.tasks and again.sha256 == bench.sha256


@needs_files
def test_download_honours_the_mirror_environment_variable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    body = (SHARED / "geneval" / "evaluation_metadata.jsonl").read_bytes()
    path = f"/djghosh13/geneval/{GENEVAL_COMMIT}/prompts/evaluation_metadata.jsonl"
    with ScriptedServer() as server:
        _serve_file(server, path, body)
        monkeypatch.setenv("GENAGENT_BENCHMARK_MIRROR", server.url + "/")
        bench = load_benchmark("geneval", download=True, cache_dir=tmp_path / "c")
    assert len(bench.tasks) == 553
    assert (tmp_path / "c").is_dir()


@needs_files
def test_a_tampered_download_is_a_checksum_error_and_nothing_is_cached(
    _isolated_cache: Path,
) -> None:
    body = (SHARED / "geneval_pp" / "Geneval++.jsonl").read_bytes().replace(b"red", b"blue", 1)
    with ScriptedServer() as server:
        _serve_file(server, GENEVAL_PP_URL_PATH, body)
        with pytest.raises(BenchmarkChecksumError, match="changed upstream") as info:
            load_benchmark("geneval++", download=True, mirror=server.url)
    assert info.value.actual == hashlib.sha256(body).hexdigest()
    assert info.value.expected != info.value.actual
    assert not [p for p in _isolated_cache.rglob("*") if p.is_file()]


@needs_files
def test_a_server_error_is_retried_then_the_download_succeeds() -> None:
    body = (SHARED / "geneval_pp" / "Geneval++.jsonl").read_bytes()
    with ScriptedServer() as server:
        _serve_file(server, GENEVAL_PP_URL_PATH, body, Reply({"error": "busy"}, status=500))
        bench = load_benchmark("geneval++", download=True, mirror=server.url)
        assert len(server.requests) == 2
    assert len(bench.tasks) == 280


def test_a_404_is_not_retried_and_says_what_to_do() -> None:
    with ScriptedServer() as server:
        server.script("GET", GENEVAL_PP_URL_PATH, Reply("not found", status=404))
        with pytest.raises(BenchmarkDownloadError, match=r"HTTP 404.*path="):
            load_benchmark("geneval++", download=True, mirror=server.url)
        assert len(server.requests) == 1


def test_a_download_over_the_size_cap_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    import genagent.evals.benchmarks as module

    monkeypatch.setattr(module, "_MAX_DOWNLOAD_BYTES", 100)
    with ScriptedServer() as server:
        server.script("GET", GENEVAL_PP_URL_PATH, Reply(b"x" * 1000))
        with pytest.raises(BenchmarkDownloadError, match="cap"):
            load_benchmark("geneval++", download=True, mirror=server.url)


def test_a_stalled_download_stops_at_its_deadline() -> None:
    with ScriptedServer() as server:
        # 4 KB at 64 bytes per 50 ms takes 3.2 s; the deadline is 10 timeouts = 1 s
        server.script("GET", GENEVAL_PP_URL_PATH, Reply(b"x" * 4096, drip_s=0.05))
        with pytest.raises(BenchmarkDownloadError, match="stalled"):
            load_benchmark("geneval++", download=True, mirror=server.url, timeout_s=0.1)


@needs_files
def test_a_damaged_cached_file_is_caught_on_load_and_fetched_again(
    _isolated_cache: Path,
) -> None:
    body = (SHARED / "geneval_pp" / "Geneval++.jsonl").read_bytes()
    with ScriptedServer() as server:
        server.always("GET", GENEVAL_PP_URL_PATH, lambda _request: Reply(body=body))
        load_benchmark("geneval++", download=True, mirror=server.url)
        (cached,) = [p for p in _isolated_cache.rglob("*") if p.is_file()]
        cached.write_bytes(body[:-50])  # truncated on disk
        with pytest.raises(BenchmarkChecksumError, match="download=True"):
            load_benchmark("geneval++")
        assert not cached.exists()  # the damaged copy is not kept
        assert len(load_benchmark("geneval++", download=True, mirror=server.url).tasks) == 280
        assert cached.read_bytes() == body


@needs_files
def test_wise_downloads_its_three_files() -> None:
    served: list[str] = []

    def handler(request: Recorded) -> Reply:
        served.append(request.path)
        name = request.path.rsplit("/", 1)[-1]
        return Reply(body=(SHARED / "wise" / "verified" / name).read_bytes())

    with ScriptedServer() as server:
        server.route("GET", rf"/PKU-YuanGroup/WISE/{WISE_COMMIT}/data_verified/.*", handler)
        bench = load_benchmark("wise", download=True, mirror=server.url)
    assert len(bench.tasks) == 1000 and len(served) == 3
    assert bench.source.endswith(f"/PKU-YuanGroup/WISE/{WISE_COMMIT}/data_verified/")


# --------------------------------------------------------------------------- custom files


def test_custom_txt_skips_blanks_and_comments_and_numbers_by_line(tmp_path: Path) -> None:
    file = tmp_path / "prompts.txt"
    file.write_text("# my prompts\na red apple\n\n  two cats  \n# done\n")
    bench = load_prompts(file)
    assert (bench.name, bench.scoring) == ("custom", "mean")
    assert [t.id for t in bench.tasks] == ["0002", "0004"]
    assert [t.prompt for t in bench.tasks] == ["a red apple", "two cats"]
    assert bench.sha256 == hashlib.sha256(file.read_bytes()).hexdigest()
    assert load_benchmark(str(file)).tasks == bench.tasks  # a path works as a name


def test_custom_jsonl_keeps_ids_categories_and_metadata(tmp_path: Path) -> None:
    file = tmp_path / "prompts.jsonl"
    records = [
        {"prompt": "a red apple", "id": "apple", "category": "color",
         "include": [{"class": "apple", "count": 1, "color": "red"}], "source": "me"},
        {"prompt": "two cats", "tag": "counting"},
        {"prompt": "a dog", "id": 7},
    ]  # fmt: skip
    file.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    bench = load_prompts(file)
    apple, cats, dog = bench.tasks
    assert (apple.id, apple.category) == ("apple", "color")
    assert apple.metadata["include"] == records[0]["include"]
    assert apple.metadata["source"] == "me" and apple.metadata["line"] == 1
    assert (cats.id, cats.category, cats.metadata["tag"]) == ("0002", "counting", "counting")
    assert (dog.id, dog.category) == ("7", None)
    summary = bench.summarize({"apple": 1.0, "0002": 0.0, "7": 0.5})
    assert summary.overall == pytest.approx(0.5)
    assert set(summary.per_category) == {"color", "counting", "uncategorized"}


def test_custom_files_of_another_kind_are_refused(tmp_path: Path) -> None:
    file = tmp_path / "prompts.csv"
    file.write_text("a cat\n")
    with pytest.raises(BenchmarkError, match=r"\.txt .* \.jsonl"):
        load_prompts(file)


# --------------------------------------------------------------------------- bad input


def test_a_truncated_jsonl_line_names_the_file_and_line(tmp_path: Path) -> None:
    file = tmp_path / "evaluation_metadata.jsonl"
    good = json.dumps({"tag": "colors", "include": [{"class": "cat"}], "prompt": "a cat"})
    file.write_text(good + "\n" + good[:25] + "\n")
    with pytest.raises(BenchmarkFileError, match="line 2: is not valid JSON") as info:
        load_benchmark("geneval", file)
    assert info.value.path == file and info.value.line == 2
    assert str(file) in str(info.value)


def test_a_record_without_a_prompt_names_its_line(tmp_path: Path) -> None:
    file = tmp_path / "g.jsonl"
    file.write_text(json.dumps({"tag": "colors", "include": [{"class": "cat"}]}) + "\n")
    with pytest.raises(BenchmarkFileError, match="line 1: has no 'prompt'"):
        load_benchmark("geneval", file)
    custom = tmp_path / "c.jsonl"
    custom.write_text('{"prompt": "a cat"}\n{"text": "a dog"}\n')
    with pytest.raises(BenchmarkFileError, match="line 2: has no 'prompt'"):
        load_prompts(custom)


def test_duplicate_custom_ids_name_both_lines(tmp_path: Path) -> None:
    file = tmp_path / "p.jsonl"
    file.write_text('{"prompt": "a cat", "id": "x"}\n{"prompt": "a dog", "id": "x"}\n')
    with pytest.raises(BenchmarkFileError, match="line 2: repeats id 'x' of line 1"):
        load_prompts(file)


@needs_files
def test_duplicate_wise_ids_are_an_error(tmp_path: Path) -> None:
    folder = tmp_path / "data_verified"
    folder.mkdir()
    for name in ("cultural_common_sense", "spatio-temporal_reasoning", "natural_science"):
        src = SHARED / "wise" / "verified" / f"{name}_verified.json"
        (folder / src.name).write_bytes(src.read_bytes())
    records = json.loads((folder / "natural_science_verified.json").read_text())
    records.append(records[0])
    (folder / "natural_science_verified.json").write_text(json.dumps(records))
    with pytest.raises(BenchmarkFileError, match="prompt_id 641 appears twice"):
        load_benchmark("wise-verified", tmp_path)


@pytest.mark.parametrize("suffix", [".jsonl", ".txt"])
def test_an_empty_file_is_an_error(tmp_path: Path, suffix: str) -> None:
    file = tmp_path / f"empty{suffix}"
    file.write_text("\n\n")
    with pytest.raises(BenchmarkFileError, match=r"empty|no prompts"):
        load_prompts(file)
    if suffix == ".jsonl":
        with pytest.raises(BenchmarkFileError, match="is empty"):
            load_benchmark("geneval", file)


@needs_files
def test_geneval_plus_plus_loaded_as_geneval_says_which_it_is() -> None:
    with pytest.raises(BenchmarkFileError, match=r"line 41: .*looks like geneval\+\+"):
        load_benchmark("geneval", SHARED / "geneval_pp" / "Geneval++.jsonl")


@needs_files
def test_a_wise_file_loaded_as_geneval_is_refused() -> None:
    with pytest.raises(BenchmarkFileError, match="JSON array"):
        load_benchmark("geneval", SHARED / "wise" / "verified" / "merge.json")


@needs_files
def test_a_geneval_file_loaded_as_wise_is_refused() -> None:
    with pytest.raises(BenchmarkFileError, match="GenEval-style JSON-lines"):
        load_benchmark("wise", SHARED / "geneval" / "evaluation_metadata.jsonl")


@needs_files
def test_a_verified_file_loaded_as_legacy_is_refused() -> None:
    file = SHARED / "wise" / "verified" / "natural_science_verified.json"
    with pytest.raises(BenchmarkFileError, match=r"record 1: .*try 'wise-verified'"):
        load_benchmark("wise-legacy", file)


def test_a_wise_record_missing_keys_names_the_record(tmp_path: Path) -> None:
    file = tmp_path / "w.json"
    file.write_text(json.dumps([{"Prompt": "x", "prompt_id": 1}]))
    with pytest.raises(BenchmarkFileError, match=r"record 1: lacks \['Explanation'"):
        load_benchmark("wise", file)


def test_limit_and_variant_are_checked() -> None:
    with pytest.raises(ConfigurationError, match="limit"):
        load_benchmark("geneval", limit=0)
    with pytest.raises(ConfigurationError, match="rewrite"):
        load_benchmark("geneval", variant="rewrite")


# --------------------------------------------------------------------------- hostile files


def test_jsonl_strings_may_hold_unicode_line_separators(tmp_path: Path) -> None:
    """U+2028, U+2029, U+0085 and form feed are valid raw inside a JSON string."""
    file = tmp_path / "p.jsonl"
    prompts = ["a cat\u2028on a mat", "a dog\x85in a park", "a cow\x0cin a field\u2029"]
    file.write_text("\n".join(json.dumps({"prompt": p}, ensure_ascii=False) for p in prompts))
    bench = load_prompts(file)
    assert [t.prompt for t in bench.tasks] == prompts
    assert [t.id for t in bench.tasks] == ["0001", "0002", "0003"]
    geneval = tmp_path / "evaluation_metadata.jsonl"
    record = {"tag": "colors", "include": [{"class": "cat"}], "prompt": "a cat\u2028"}
    geneval.write_text(json.dumps(record, ensure_ascii=False) + "\n")
    assert load_benchmark("geneval", geneval).tasks[0].prompt == "a cat\u2028"


def test_txt_lines_split_at_newlines_only_and_ids_are_line_numbers(tmp_path: Path) -> None:
    file = tmp_path / "p.txt"
    file.write_bytes("a cat\u2028on a mat\r\na dog\x0cin a park\n\nthird\x85one\n".encode())
    bench = load_prompts(file)
    assert [t.prompt for t in bench.tasks] == [
        "a cat\u2028on a mat", "a dog\x0cin a park", "third\x85one"
    ]  # fmt: skip
    assert [t.id for t in bench.tasks] == ["0001", "0002", "0004"]
    assert [t.metadata["line"] for t in bench.tasks] == [1, 2, 4]
    assert [t.metadata["index"] for t in bench.tasks] == [0, 1, 2]


@pytest.mark.parametrize(
    ("record", "where"),
    [
        ('{"prompt": "a dog \\ud83d"}', "'prompt'"),
        ('{"prompt": "a dog", "id": "x\\udc00"}', "'id'"),
        ('{"prompt": "a dog", "category": "\\udfff"}', "'category'"),
        ('{"prompt": "a dog", "extra": {"k": ["\\ud800"]}}', "'extra'"),
        ('{"prompt": "a dog", "\\ud800": 1}', "a key"),
    ],
)
def test_a_lone_surrogate_is_a_file_error_naming_the_line(
    tmp_path: Path, record: str, where: str
) -> None:
    file = tmp_path / "p.jsonl"
    file.write_text('{"prompt": "a cat"}\n' + record + "\n")
    with pytest.raises(BenchmarkFileError, match="line 2: has a lone surrogate") as info:
        load_prompts(file)
    assert info.value.line == 2 and where in str(info.value)


def test_a_lone_surrogate_in_an_official_file_is_a_file_error(tmp_path: Path) -> None:
    geneval = tmp_path / "evaluation_metadata.jsonl"
    geneval.write_text('{"tag": "colors", "include": [{"class": "c\\ud83d"}], "prompt": "x"}\n')
    with pytest.raises(BenchmarkFileError, match="line 1: has a lone surrogate"):
        load_benchmark("geneval", geneval)
    wise = tmp_path / "w.json"
    record = {
        "Prompt": "a dog \ud83d", "Explanation": "e", "Category": "Cultural knowledge",
        "Subcategory": "s", "prompt_id": 1,
    }  # fmt: skip
    wise.write_text(json.dumps([record]))  # ensure_ascii: written as the escape \ud83d
    with pytest.raises(BenchmarkFileError, match="record 1: has a lone surrogate"):
        load_benchmark("wise", wise)


def test_json_nested_too_deeply_is_a_file_error(tmp_path: Path) -> None:
    file = tmp_path / "p.jsonl"
    deep = "[" * 100_000 + "]" * 100_000
    file.write_text('{"prompt": "a cat"}\n{"prompt": "a dog", "x": ' + deep + "}\n")
    with pytest.raises(BenchmarkFileError, match="line 2: holds JSON nested too deeply"):
        load_prompts(file)
    wise = tmp_path / "w.json"
    wise.write_text(deep)
    with pytest.raises(BenchmarkFileError, match="nested too deeply"):
        load_benchmark("wise", wise)
    # deep enough for json but not for a task's metadata (JSON values, checked by pydantic)
    middling = "[" * 900 + "]" * 900
    file.write_text('{"prompt": "a dog", "x": ' + middling + "}\n")
    with pytest.raises(BenchmarkFileError, match="line 1: has a 'metadata' that is not valid"):
        load_prompts(file)


@pytest.mark.parametrize("bom", [b"", b"\xef\xbb\xbf"])
def test_bytes_that_are_not_utf8_name_their_line(tmp_path: Path, bom: bytes) -> None:
    for suffix in (".txt", ".jsonl"):
        file = tmp_path / f"p{suffix}"
        file.write_bytes(bom + b'{"prompt": "a cat"}\n{"prompt": "a \xff\xfe dog"}\n')
        byte = 34 + len(bom)  # the offset of \xff in the file
        with pytest.raises(
            BenchmarkFileError, match=rf"line 2: is not UTF-8 text \(byte {byte} "
        ) as info:
            load_prompts(file)
        assert info.value.line == 2 and info.value.path == file


# --------------------------------------------------------------------------- slices


def _custom(tmp_path: Path) -> Benchmark:
    file = tmp_path / "p.jsonl"
    records = [
        {"prompt": "a cat", "category": "animals"},
        {"prompt": "a dog", "category": "animals"},
        {"prompt": "a red cup", "category": "colors"},
        {"prompt": "a blue cup", "category": "colors", "index": "mine"},
    ]
    file.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return load_prompts(file)


def test_a_whole_benchmark_is_not_partial(tmp_path: Path) -> None:
    bench = _custom(tmp_path)
    assert (bench.full_tasks, bench.full_categories, bench.is_partial) == (None, None, False)
    summary = bench.summarize({"0001": 1.0, "0002": 0.0, "0003": 1.0, "0004": 1.0})
    assert summary.complete and not summary.partial and summary.total is None
    assert "PARTIAL" not in summary.rule
    assert bench.subset(bench.tasks).summarize({t.id or "": 1.0 for t in bench.tasks}).complete


def test_a_slice_says_it_is_not_the_official_figure(tmp_path: Path) -> None:
    bench = _custom(tmp_path)
    colors = bench.subset([t for t in bench.tasks if t.category == "colors"])
    assert colors.full_tasks == 4 and colors.full_categories == ("animals", "colors")
    summary = colors.summarize({"0003": 1.0, "0004": 0.0})
    assert summary.overall == pytest.approx(0.5)  # the slice, by the same rule
    assert summary.missing == 0 and summary.n == 2
    assert not summary.complete and summary.partial and summary.total == 4
    assert "a slice of 2 of 4 prompts, 1 of its 2 categories" in summary.rule
    assert "not the official figure" in summary.rule
    assert summary.rule.startswith(bench.rule)
    # a slice of a slice still knows the whole benchmark
    first = colors.subset(colors.tasks[:1])
    assert (first.full_tasks, first.full_categories) == (4, ("animals", "colors"))
    assert "a slice of 1 of 4 prompts" in first.summarize({"0003": 1.0}).rule
    # limit= loads a slice too
    limited = load_prompts(tmp_path / "p.jsonl", limit=3)
    assert limited.full_tasks == 4 and limited.is_partial
    assert not limited.summarize({"0001": 1.0, "0002": 1.0, "0003": 1.0}).complete
    assert not load_prompts(tmp_path / "p.jsonl", limit=10).is_partial


def test_custom_tasks_know_their_index_and_keep_their_own(tmp_path: Path) -> None:
    bench = _custom(tmp_path)
    assert [t.metadata["index"] for t in bench.tasks] == [0, 1, 2, 3]
    assert bench.tasks[3].metadata["record_index"] == "mine"
    sliced = bench.subset(bench.tasks[2:])
    assert [t.metadata["index"] for t in sliced.tasks] == [2, 3]


def test_a_wise_category_slice_is_partial(tmp_path: Path) -> None:
    tasks = [
        Task(prompt=f"p{i}", id=str(i), category=c)
        for i, c in enumerate(["cultural", "time", "space"], 1)
    ]
    bench = Benchmark(name="wise-verified", tasks=tasks, source="x", sha256=None, scoring="binary")
    whole = bench.summarize({"1": 1.0, "2": 1.0, "3": 0.0})
    assert not whole.partial  # incomplete (three categories absent), but not a slice
    cultural = bench.subset(tasks[:1]).summarize({"1": 1.0})
    assert cultural.partial and cultural.overall == pytest.approx(1.0)
    assert "a slice of 1 of 3 prompts, 1 of its 3 categories" in cultural.rule


def test_full_tasks_below_the_task_count_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="full_tasks"):
        Benchmark(
            name="custom", tasks=[Task(prompt="a", id="1"), Task(prompt="b", id="2")],
            source="x", sha256=None, scoring="mean", full_tasks=1,
        )  # fmt: skip


# --------------------------------------------------------------------------- the simulator


def _canonical(spec: SceneSpec) -> tuple[list[tuple[object, ...]], list[tuple[object, ...]]]:
    """What a scene asks for, independent of group order and relation direction."""
    opposite = {"right of": "left of", "below": "above"}
    objects = sorted((o.cls, o.count, o.color, o.size, o.region) for o in spec.objects)
    relations = []
    for obj in spec.objects:
        if obj.relation is None:
            continue
        relation, j = obj.relation
        a, b = (obj.cls, obj.color), (spec.objects[j].cls, spec.objects[j].color)
        if relation in opposite:  # "A right of B" is "B left of A"
            relation, a, b = opposite[relation], b, a
        relations.append((a, relation, b))
    return objects, sorted(relations, key=repr)


@needs_files
@pytest.mark.parametrize("name", ["geneval", "geneval++"])
def test_the_simulator_parses_every_prompt_as_its_metadata_says(name: str) -> None:
    bench = load_benchmark(name, SHARED)
    wrong = [
        task.prompt
        for task in bench.tasks
        if _canonical(parse_caption(task.prompt))
        != _canonical(SceneSpec.from_include(task.metadata["include"]))
    ]
    assert wrong == []
    assert len(bench.tasks) == {"geneval": 553, "geneval++": 280}[name]
