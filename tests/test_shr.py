"""SHR against the official code's outputs (tests/data/shr) and end to end through a loopback judge."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import typer
from openai_server import FakeOpenAIServer, Reply, Status
from typer.testing import CliRunner

from hallu.commands.eval_shr import shr as shr_command
from hallu.errors import HalluError
from hallu.evals import shr
from hallu.judges.openai import JudgeConfig, OpenAIJudge

os.environ.setdefault("HF_HUB_OFFLINE", "1")
DATA = Path(__file__).parent / "data" / "shr"
KEY = "sk-shr-test-secret-987654321"
EXPECTED = json.loads((DATA / "dev_expected.json").read_text())["per_image"]
RESPONSES = json.loads((DATA / "dev_responses.json").read_text())
JUDGEMENTS = json.loads((DATA / "dev_judgements.json").read_text())
# A phrase only image 101's / 102's judge prompt contains, to route canned replies.
MARK = {"101": "a brown dog lying on grass", "102": "a silver toaster"}


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)


@pytest.fixture
def server():
    with FakeOpenAIServer() as s:
        yield s


@pytest.fixture
def vg_dir(tmp_path) -> Path:
    d = tmp_path / "vg"
    d.mkdir()
    shutil.copy(DATA / "dev_image_data.json", d / "image_data.json")
    shutil.copy(DATA / "dev_region_descriptions.json", d / "region_descriptions.json")
    return d


def load_vg() -> shr.VisualGenome:
    return shr.load_visual_genome(DATA / "dev_image_data.json", DATA / "dev_region_descriptions.json")


def judge_for(server, tmp_path, **kw) -> OpenAIJudge:
    kw.setdefault("backoff_base_s", 0.01)
    kw.setdefault("backoff_max_s", 0.05)
    return OpenAIJudge(JudgeConfig(base_url=server.base_url, **kw), tmp_path / "judge_cache.jsonl")


def canned(server, **override):
    for image_id, mark in MARK.items():
        server.on(mark, *override.get(image_id, [Reply(JUDGEMENTS[image_id])]))


def post_processed(item) -> list[dict]:
    return [
        {"model_response": s, "judgement": j, "classification": c}
        for s, j, c in zip(item["sentences"], item["judgements"], item["classes"], strict=True)
    ]


EXPECTED_METRICS = {
    # image 101: correct, correct, cannot judge, hallucination (10, 8, 4, 7 words);
    # image 102: correct, correct, hallucination, cannot judge (8, 8, 6, 6 words).
    "shr": 0.25,
    "hal_sents_ratio": 0.25,
    "hal_words_ratio": 0.228,  # 13 / 57
    "sents_per_image": 4.0,
    "words_per_image": 28.5,
    "hal_sents_per_image": 1.0,
    "hal_words_per_image": 6.5,
    "gram_1_repetition": 0.756,  # mean of the per-image values in dev_expected.json
    "gram_2_repetition": 0.935,
    "gram_3_repetition": 0.968,
    "gram_4_repetition": 0.983,
}


# --- the official text rules, per image -------------------------------------------------------------


@pytest.mark.parametrize("image_id", sorted(EXPECTED))
def test_per_image_fields_match_official(image_id):
    exp, response = EXPECTED[image_id], RESPONSES[image_id]
    numbered, repeated = shr.numbered_sentences(response)
    assert numbered == exp["model_cap_sep"]
    assert repeated is exp["is_repeated"]
    assert shr.split_sentences(response) == exp["seg_cap"]
    assert load_vg().region_text(int(image_id)) == exp["region_description_text"]
    for n, value in exp["gram_repetition"].items():
        assert shr.repetition(response, int(n)) == value
    judgements, classes, status = shr.parse_judgement(JUDGEMENTS[image_id], response)
    assert status == "ok"
    item = {"sentences": shr.split_sentences(response), "judgements": judgements, "classes": classes}
    assert post_processed(item) == exp["post_processed_judgement"]


def test_sentence_rules_quirks():
    # Every "." splits (Mr., 2.5); exact repeats and substrings of kept sentences are dropped.
    numbered, repeated = shr.numbered_sentences("Mr. Smith has 2.5 dogs. Smith has 2. A cat")
    assert numbered == "1. Mr\n2. Smith has 2\n3. 5 dogs\n4. A cat\n" and repeated is True
    assert shr.split_sentences("What? Yes. yes") == ["What? Yes.", "yes."]
    assert shr.split_sentences("Why?") == ["Why?."]  # the "." is appended even after "?"
    assert shr.numbered_sentences("") == ("", False) and shr.split_sentences(" . ") == []
    assert shr.word_count("a  b.") == 3  # split on the single space, as get_metric does


def test_parse_judgement_rules():
    response = "A dog. A cat."
    reply = "Sure.\n\nJudgement:\n1. Correct: yes\n\n2. hallucination: no: really\n"
    assert shr.parse_judgement(reply, response) == (["Correct: yes", "hallucination: no: really"],
                                                    ["correct", "hallucination"], "ok")
    # Lines are only taken after the first line *containing* "Judgement:"; the first token is dropped.
    assert shr.parse_judgement("My Judgement: below\n1.correct: x\n2. partially correct", response)[1] == [
        "x", "partially correct"]
    # A count mismatch makes every sentence None (the official rule).
    assert shr.parse_judgement("Judgement:\n1. correct: x", response) == ([None, None], [None, None],
                                                                           "count_mismatch")
    # No "Judgement:" line: the official code raises IndexError; here it is a status.
    assert shr.parse_judgement("Judgement\n1. correct\n2. correct", response)[2] == "no_judgement"
    assert not shr.has_judgement("judgement: lower case") and shr.has_judgement("x\nJudgement:")


def test_repetition_guard_for_short_responses():
    assert shr.repetition("one two", 3) is None and shr.repetition("", 1) is None
    assert shr.repetition("a a a", 1) == pytest.approx(1 / 3)
    # "\n" is deleted, gluing words across lines: "a\nb a b" -> "ab a b".
    assert shr.repetition("a\nb a b", 1) == 1.0


def test_metrics_match_get_metric():
    items = []
    for image_id, response in RESPONSES.items():
        it = shr.new_item(int(image_id), response)
        shr.apply_reply(it, JUDGEMENTS[image_id])
        items.append(it)
    metrics, counts = shr.compute_metrics(items)
    assert metrics == EXPECTED_METRICS
    assert counts["images"] == 2 and counts["sentences"] == 8 and counts["repeated_responses"] == 1


def test_ratio_counts_only_the_three_classes():
    it = shr.new_item(1, "A. B. C. D")
    shr.apply_reply(it, "Judgement:\n1. hallucination: x\n2. partially correct: y\n3. correct\n4. cannot judge")
    metrics, counts = shr.compute_metrics([it])
    assert metrics["hal_sents_ratio"] == round(1 / 3, 3)  # "partially correct" leaves both sides
    assert metrics["sents_per_image"] == 4.0 and counts["unclassified_sentences"] == 1


def test_no_classified_sentence_gives_none_not_a_crash():
    it = shr.new_item(1, "A dog. Two")
    shr.apply_reply(it, "Judgement:\n1. correct")  # mismatch -> None classes
    metrics, counts = shr.compute_metrics([it])
    assert metrics["shr"] is None and metrics["hal_words_ratio"] is None
    assert metrics["gram_4_repetition"] is None and counts["repetition_skipped"] == {"1": 0, "2": 0, "3": 0, "4": 1}
    assert counts["count_mismatch"] == 1


def test_prompt_template_and_fill():
    text, digest = shr.load_judge_prompt()
    assert digest.startswith("sha256:")
    for ph in ("{regions}", "{facts}", "{sentences}"):
        assert text.count(ph) == 1
    assert "Judgement:\n1. hallucination or correct or cannot judge: <reason>" in text
    filled = shr.fill_prompt(text, "[0.1, 0.2, 0.3, 0.4]: {facts}", "fact {x}\n", "1. A {sentences}\n")
    assert "[0.1, 0.2, 0.3, 0.4]: {facts}" in filled and "fact {x}" in filled and "1. A {sentences}" in filled
    with pytest.raises(HalluError):
        shr.load_judge_prompt("shr-judge-v999")


def test_facts_later_file_wins(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text('{"1": ["x"]}\n{"2": ["y"]}\n')
    b.write_text('{"2": ["z"], "3": ["ignored: only the first key counts"]}\n')
    assert shr.load_facts([a, b]) == {"1": ["x"], "2": ["z"]}
    b.write_text('{"2": "not a list"}\n')
    with pytest.raises(HalluError, match=r"b\.jsonl:1"):
        shr.load_facts([b])


def test_missing_vg_image_is_a_clear_error():
    with pytest.raises(HalluError, match="no image 999"):
        load_vg().region_text(999)


# --- end to end through the loopback judge ----------------------------------------------------------


def run_eval(server, tmp_path, **kw):
    judge = judge_for(server, tmp_path, **kw.pop("judge_kw", {}))
    facts = shr.load_facts([DATA / "dev_factual.jsonl"])
    result = shr.evaluate(RESPONSES, load_vg(), facts, judge, **kw)
    return result, judge


def test_evaluate_matches_official_and_records_settings(server, tmp_path):
    canned(server)
    result, judge = run_eval(server, tmp_path)
    assert result["benchmark"] == "shr"
    assert result["metrics"] == EXPECTED_METRICS
    for item in result["items"]:
        exp = EXPECTED[str(item["image_id"])]
        assert item["numbered"] == exp["model_cap_sep"] and item["is_repeated"] is exp["is_repeated"]
        assert item["sentences"] == exp["seg_cap"]
        assert {str(k): v for k, v in item["repetition"].items()} == exp["gram_repetition"]
        assert post_processed(item) == exp["post_processed_judgement"]
        assert item["status"] == "ok" and item["raw_judgement"] == JUDGEMENTS[str(item["image_id"])]
    s = result["settings"]
    assert s["judge_model"] == "gpt-4-0613" and s["judge_model_source"] == "api"
    assert s["judge_model_requested"] == "gpt-4" and s["prompt_version"] == "shr-judge-v1"
    assert s["base_url"] == server.base_url.split("//")[1].split("/")[0]
    assert result["counts"]["judge_format_failures"] == 0 and result["usage"]["new_replies"] == 2
    # One user message per image with the official decoding and the three blocks filled in.
    assert len(server.requests) == 2
    for r in server.requests:
        body = r.body
        assert len(body["messages"]) == 1 and body["messages"][0]["role"] == "user"
        assert body["model"] == "gpt-4" and body["temperature"] == 0.7 and body["top_p"] == 1.0
        assert body["max_tokens"] == 800 and body["stop"] == ["###"] and body["n"] == 1
        assert body["logit_bias"] == {"50256": -100}
    prompt_101 = next(r.prompt for r in server.requests if MARK["101"] in r.prompt)
    assert EXPECTED["101"]["region_description_text"] in prompt_101
    assert "There is exactly one dog in the image.\nThe frisbee is red.\n" in prompt_101
    assert EXPECTED["101"]["model_cap_sep"] in prompt_101
    prompt_102 = next(r.prompt for r in server.requests if MARK["102"] in r.prompt)
    assert "Factual information:\n\n\n" in prompt_102  # no facts for 102: an empty block


def test_rerun_uses_the_cache(server, tmp_path):
    canned(server)
    first, _ = run_eval(server, tmp_path)
    n = len(server.requests)
    again, judge = run_eval(server, tmp_path)
    assert len(server.requests) == n  # zero new HTTP requests
    assert again["metrics"] == first["metrics"] and again["items"] == first["items"]
    assert again["usage"]["cached_replies"] == 2 and again["usage"]["http_requests"] == 0


def test_reply_without_judgement_is_retried_then_succeeds(server, tmp_path):
    canned(server, **{"102": [Reply("I cannot help with that."), Reply(JUDGEMENTS["102"])]})
    result, _ = run_eval(server, tmp_path)
    assert result["metrics"] == EXPECTED_METRICS
    item = next(i for i in result["items"] if i["image_id"] == 102)
    assert item["judge_attempts"] == 2 and item["status"] == "ok"
    assert len(server.requests) == 3


@pytest.mark.parametrize("bad", ["No verdict here.", "Judgement\n1. correct\n2. correct\n3. correct\n4. correct"])
def test_reply_without_judgement_is_bounded_then_counted(server, tmp_path, bad):
    # The official loop would spin forever on the first reply and crash (IndexError) on the second.
    canned(server, **{"102": [Reply(bad)]})
    result, _ = run_eval(server, tmp_path, format_attempts=3)
    item = next(i for i in result["items"] if i["image_id"] == 102)
    assert item["status"] == "no_judgement" and item["judge_attempts"] == 3
    assert item["classes"] == [None] * 4
    assert result["counts"]["judge_format_failures"] == 1
    assert len([r for r in server.requests if MARK["102"] in r.prompt]) == 3
    # Only image 101 is classified; 102's sentences still count per image.
    assert result["metrics"]["shr"] == 0.25 and result["metrics"]["sents_per_image"] == 4.0
    # The three samples are cached apart, so a rerun reproduces the outcome with no calls.
    n = len(server.requests)
    again, _ = run_eval(server, tmp_path, format_attempts=3)
    assert len(server.requests) == n and again["items"] == result["items"]


def test_api_failure_is_counted_and_retried_on_rerun(server, tmp_path):
    canned(server, **{"102": [Status(500), Status(500), Reply(JUDGEMENTS["102"])]})
    result, _ = run_eval(server, tmp_path, judge_kw={"max_attempts": 2})
    item = next(i for i in result["items"] if i["image_id"] == 102)
    assert item["status"] == "api_error" and "HTTP 500" in item["judge_error"]
    assert result["counts"]["judge_api_failures"] == 1
    again, _ = run_eval(server, tmp_path, judge_kw={"max_attempts": 2})
    assert again["metrics"] == EXPECTED_METRICS and again["counts"]["judge_api_failures"] == 0


def test_judge_failing_everywhere_is_an_error_not_a_metric(server, tmp_path):
    server.on(lambda r: True, Status(503))
    with pytest.raises(HalluError, match="failed for all 2 images.*HTTP 503"):
        run_eval(server, tmp_path, judge_kw={"max_attempts": 2})


def test_count_mismatch_gives_none_classes(server, tmp_path):
    canned(server, **{"101": [Reply("Judgement:\n1. correct: only one line")]})
    result, _ = run_eval(server, tmp_path)
    item = next(i for i in result["items"] if i["image_id"] == 101)
    assert item["status"] == "count_mismatch" and item["classes"] == [None] * 4
    assert result["counts"]["count_mismatch"] == 1
    assert result["metrics"]["shr"] == 0.25  # 1 of 102's 4 sentences
    assert result["metrics"]["sents_per_image"] == 4.0


def test_image_list_order_and_missing_response(server, tmp_path):
    canned(server)
    result, _ = run_eval(server, tmp_path, image_ids=[102, 101])
    assert [i["image_id"] for i in result["items"]] == [102, 101]
    with pytest.raises(HalluError, match="no response for image 103"):
        run_eval(server, tmp_path, image_ids=[101, 103])


def test_empty_response_is_not_sent(server, tmp_path):
    canned(server)
    judge = judge_for(server, tmp_path)
    responses = {**RESPONSES, "102": "  .  "}
    result = shr.evaluate(responses, load_vg(), {}, judge)
    assert len(server.requests) == 1 and result["counts"]["empty_responses"] == 1


def test_max_cost_stops_with_a_clear_error(server, tmp_path):
    canned(server)
    kw = {"model": "pricey", "prices": {"pricey": (1e6, 0.0)}, "max_cost": 0.5, "concurrency": 1}
    with pytest.raises(HalluError, match="max cost"):
        run_eval(server, tmp_path, judge_kw=kw)
    assert len(server.requests) == 1


def test_rescore_without_calls(server, tmp_path):
    canned(server)
    result, _ = run_eval(server, tmp_path)
    again = shr.rescore(json.loads(json.dumps(result)))
    assert again["metrics"] == result["metrics"] and again["items"] == result["items"]
    assert again["settings"]["rescored"] is True
    # HA-DPO's own judgement.json (note its "mode_response" key) rescoring to the same numbers.
    official = {"run1": {k: {"raw_judgement": JUDGEMENTS[k], "mode_response": RESPONSES[k], "judgement": []}
                         for k in RESPONSES}}
    assert shr.rescore(official)["metrics"] == EXPECTED_METRICS


def test_no_judge_gives_repetition_only():
    result = shr.evaluate(RESPONSES, load_vg(), {}, None)
    m = result["metrics"]
    assert m["shr"] is None and m["gram_1_repetition"] == 0.756 and m["sents_per_image"] == 4.0
    assert result["settings"]["judged"] is False and result["usage"] == {}


def test_generation_requests():
    [r] = shr.generation_requests([101], load_vg(), "/vg")
    assert r["image"] == "/vg/VG_100K/101.jpg" and r["prompt"] == "Describe this image in detail."
    assert r["generation"]["num_beams"] == 5 and r["generation"]["do_sample"] is False


# --- the command ------------------------------------------------------------------------------------


def cli_app() -> typer.Typer:
    app = typer.Typer()
    app.command()(shr_command)  # the command wraps itself in the error boundary
    return app


def cli_args(server, vg_dir, out: Path, *extra: str) -> list[str]:
    return [
        "--responses", str(DATA / "dev_responses.json"), "--vg", str(vg_dir),
        "--facts", str(DATA / "dev_factual.jsonl"), "--json", str(out),
        "--base-url", server.base_url, "--concurrency", "2", *extra,
    ]


def test_cli_end_to_end(server, vg_dir, tmp_path):
    canned(server)
    out = tmp_path / "res" / "shr.json"
    runner = CliRunner()
    r = runner.invoke(cli_app(), cli_args(server, vg_dir, out))
    assert r.exit_code == 0, r.output
    assert "SHR" in r.stdout and "0.250" in r.stdout
    result = json.loads(out.read_text())
    assert result["metrics"] == EXPECTED_METRICS
    assert set(result["settings"]["inputs"]) == {"responses", "facts", "image_data", "region_descriptions"}
    cache = out.parent / "judge_cache.jsonl"
    assert cache.exists()
    for path in (out, cache):
        assert KEY not in path.read_text()
    n = len(server.requests)
    r = runner.invoke(cli_app(), cli_args(server, vg_dir, out))
    assert r.exit_code == 0 and len(server.requests) == n  # the rerun hits the cache
    # Rescoring needs neither the key nor the endpoint.
    os.environ.pop("OPENAI_API_KEY")
    rescored = tmp_path / "rescored.json"
    r = runner.invoke(cli_app(), ["--json", str(rescored), "--rescore", str(out)])
    assert r.exit_code == 0, r.output
    assert json.loads(rescored.read_text())["metrics"] == EXPECTED_METRICS


def test_cli_missing_key_fails_before_any_request(server, vg_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY")
    canned(server)
    out = tmp_path / "shr.json"
    r = CliRunner().invoke(cli_app(), cli_args(server, vg_dir, out))
    assert r.exit_code == 2
    assert "OPENAI_API_KEY" in r.output and "error" in r.output
    assert server.requests == [] and not out.exists()


def test_cli_api_failures_are_reported(server, vg_dir, tmp_path):
    canned(server, **{"102": [Status(500)]})
    out = tmp_path / "shr.json"
    r = CliRunner().invoke(cli_app(), cli_args(server, vg_dir, out, "--max-attempts", "2"))
    assert r.exit_code == 0, r.output
    assert "API failures 1" in r.output and "warning" in r.output
    assert json.loads(out.read_text())["counts"]["judge_api_failures"] == 1


def test_cli_no_judge_and_input_errors(vg_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY")
    out = tmp_path / "rep.json"
    args = ["--responses", str(DATA / "dev_responses.json"), "--vg", str(vg_dir), "--json", str(out)]
    r = CliRunner().invoke(cli_app(), [*args, "--no-judge"])
    assert r.exit_code == 0, r.output
    assert json.loads(out.read_text())["metrics"]["gram_4_repetition"] == 0.983
    r = CliRunner().invoke(cli_app(), args)
    assert r.exit_code == 2 and "--facts" in r.output
    r = CliRunner().invoke(cli_app(), ["--json", str(out), "--vg", str(tmp_path)])
    assert r.exit_code == 2 and "--responses" in r.output


# --- response formats and the result shape ---------------------------------------------------------


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_responses_as_jsonl_records_equal_the_official_dict(tmp_path):
    rows = [{"image_id": int(k), "text": v, "model": "x"} for k, v in RESPONSES.items()]
    assert shr.load_responses(_jsonl(tmp_path / "r.jsonl", rows)) == RESPONSES
    (tmp_path / "r.json").write_text(json.dumps(rows))  # a JSON list of the same records
    assert shr.load_responses(tmp_path / "r.json") == RESPONSES
    one = _jsonl(tmp_path / "one.jsonl", rows[:1])  # a one-line file is one record, not the official dict
    assert shr.load_responses(one) == {str(rows[0]["image_id"]): rows[0]["text"]}
    assert shr.load_responses(DATA / "dev_responses.json") == RESPONSES


@pytest.mark.parametrize("rows, message", [
    ([{"image_id": 101, "text": "a"}, {"image_id": "101", "text": "b"}],
     r"r\.jsonl:2: a second response for image 101 \(first at .*r\.jsonl:1\)"),
    ([{"image_id": 101, "text": "a"}, {"image_id": 102}], r"r\.jsonl:2: expected a record \{\"image_id\", \"text\"\}"),
    ([{"image_id": 101, "text": "a"}, {"image_id": "x", "text": "b"}], r"r\.jsonl:2: image id 'x' is not an integer"),
    ([{"image_id": 101, "text": "a"}, {"image_id": 102, "text": 3}], r"r\.jsonl:2: 'text' is int"),
])
def test_jsonl_response_errors_name_the_line(tmp_path, rows, message):
    with pytest.raises(HalluError, match=message):
        shr.load_responses(_jsonl(tmp_path / "r.jsonl", rows))


def test_cli_reads_jsonl_responses_and_writes_the_eval_result_shape(vg_dir, tmp_path, monkeypatch):
    from hallu.records import read_eval_result

    monkeypatch.delenv("OPENAI_API_KEY")
    jsonl = _jsonl(tmp_path / "r.jsonl", [{"image_id": int(k), "text": v} for k, v in RESPONSES.items()])
    outs = []
    for responses in (DATA / "dev_responses.json", jsonl):
        out = tmp_path / f"{responses.stem}.out.json"
        r = CliRunner().invoke(cli_app(), ["--responses", str(responses), "--vg", str(vg_dir), "--json", str(out),
                                           "--no-judge"])
        assert r.exit_code == 0, r.output
        outs.append(read_eval_result(out))
    official, ours = outs
    assert ours.metrics == official.metrics and ours.items == official.items
    assert ours.splits == {"all": {"metrics": ours.metrics, "count": len(RESPONSES)}}
    assert ours.settings["parser"] == "shr-official" and ours.settings["request"] is None
    assert ours.settings["inputs"]["responses"]["path"] == str(jsonl) and ours.missing_settings() == []
