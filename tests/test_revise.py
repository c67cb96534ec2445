"""The revise stage through the CLI: revisions and pairs that reload, resume, and one clear line per bad input."""

import json
import shutil

import pytest
from typer.testing import CliRunner

from hallu.commands import app
from hallu.errors import HalluError
from hallu.manifest import Run
from hallu.methods import opa_dpo
from hallu.objects import node_words
from hallu.records import PreferencePair, Prompt, Response, Revision, read_records, write_records

runner = CliRunner()


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_one_error_line(result, *fragments):
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line, got: {result.output!r}"
    assert lines[0].startswith("error: ") and "Traceback" not in result.output
    for f in fragments:
        assert f in lines[0], (f, lines[0])


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("revise") / "world"
    r = cli("prepare", "shapes", "--out", root, "--images", 8, "--seed", 2)
    assert r.exit_code == 0, r.output
    return root


def _responses(world, path, prompts=None):
    """Two samples per caption prompt: the clean reference, and the reference plus one absent object."""
    prompts = prompts or read_records(world / "data" / "prompts.jsonl", Prompt)
    rows = []
    for p in prompts:
        rows.append(Response(id=f"{p.id}#0", prompt_id=p.id, sample=0, text=p.reference, model="m").to_dict())
        extra = "There is a giraffe in the corner." if "giraffe" not in p.objects else "There is a zebra."
        rows.append(Response(id=f"{p.id}#1", prompt_id=p.id, sample=1, text=f"{p.reference} {extra}",
                             model="m").to_dict())
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return prompts


def _run(world, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(world, run)
    return run


def test_annotations_dpo_pairs_reload_and_rerun_is_identical(world, tmp_path):
    run = _run(world, tmp_path)
    resp = tmp_path / "responses.jsonl"
    prompts = _responses(world, resp)
    r = cli("revise", "--run", run, "--responses", resp, "--batch-size", 3)
    assert r.exit_code == 0, r.output
    revs = read_records(run / "revise" / "revisions.jsonl", Revision)
    assert [v.id for v in revs] == [f"{p.id}#{s}" for p in prompts for s in (0, 1)]
    pairs = read_records(run / "revise" / "pairs.jsonl", PreferencePair)
    # the clean sample gives no pair (nothing to correct); the other gives reference ≻ reference + giraffe
    assert [p.id for p in pairs] == [f"{p.id}#1" for p in prompts]
    by_prompt = {p.id: p for p in prompts}
    for pair in pairs:
        prompt = by_prompt[pair.meta["prompt_id"]]
        assert pair.chosen == prompt.reference and pair.rejected.startswith(prompt.reference)
        assert pair.prompt == prompt.question and pair.meta["method"] == "dpo"
        assert pair.meta["hallucinated"] in (["giraffe"], ["zebra"])
        assert all(json.loads(json.dumps(i)).startswith("/") for i in pair.images)
        assert all((run / "data" / img).resolve().as_posix() in pair.images for img in prompt.images)
    rec = Run(run).read()["stages"]["revise"]
    assert rec["status"] == "done" and rec["outputs"]["pairs"]["count"] == len(prompts)
    assert rec["outputs"]["revisions"]["count"] == 2 * len(prompts)
    assert rec["skipped"] == {"judge found nothing to correct": len(prompts)}
    assert rec["options"]["judge_options"] == {"mode": "remove", "use_reference": True}
    before = [(run / "revise" / f).read_bytes() for f in ("revisions.jsonl", "pairs.jsonl")]
    r = cli("revise", "--run", run, "--responses", resp, "--batch-size", 3)
    assert r.exit_code == 0, r.output
    assert [(run / "revise" / f).read_bytes() for f in ("revisions.jsonl", "pairs.jsonl")] == before


def test_opa_pairs_carry_what_the_opa_trainer_reads(world, tmp_path):
    run = _run(world, tmp_path)
    resp = tmp_path / "responses.jsonl"
    prompts = _responses(world, resp)
    r = cli("revise", "--run", run, "--responses", resp, "--method", "opa-dpo", "--mode", "rewrite")
    assert r.exit_code == 0, r.output
    pairs = read_records(run / "revise" / "pairs.jsonl", PreferencePair)
    assert len(pairs) == 2 * len(prompts)  # OPA keeps unchanged answers too: they anchor the revised side
    for pair in pairs:
        m = pair.meta
        assert pair.chosen == m["gt"] and pair.rejected == m["original"]
        assert set(node_words(m["revised"])) <= set(node_words(m["gt"]))
        # every report sentence is found in its text, so each token gets its sentence's weight
        for text, key in ((pair.rejected, "sentences_original"), (m["revised"], "sentences_revised")):
            spans = opa_dpo.char_weights(text, m[key], "score")
            assert len(spans) == len(m[key]) > 0
        weights = {w for *_, w in opa_dpo.char_weights(pair.rejected, m["sentences_original"], "score")}
        assert weights == ({1.0, 2.0} if pair.id.endswith("#1") else {1.0})


def test_resume_after_a_stop_midway_equals_an_uninterrupted_run(world, tmp_path, monkeypatch):
    from hallu.errors import HalluError
    from hallu.judges import annotations

    resp = tmp_path / "responses.jsonl"
    _responses(world, resp)
    whole = _run(world, tmp_path / "a")
    assert cli("revise", "--run", whole, "--responses", resp, "--batch-size", 2).exit_code == 0

    broken = _run(world, tmp_path / "b")
    real, calls = annotations.judge_groups, []

    def flaky(groups, options, progress=None):
        calls.append(len(groups))
        if len(calls) == 3:
            raise HalluError("judge: stopped on purpose")
        return real(groups, options, progress=progress)

    monkeypatch.setattr(annotations, "judge_groups", flaky)
    assert_one_error_line(cli("revise", "--run", broken, "--responses", resp, "--batch-size", 2), "on purpose")
    rec = Run(broken).read()["stages"]["revise"]
    assert rec["status"] == "failed" and "on purpose" in rec["error"]
    kept = (broken / "revise" / "revisions.jsonl").read_text().splitlines()
    assert len(kept) == 8  # two finished batches of 2 prompts x 2 samples
    calls.clear()
    assert cli("revise", "--run", broken, "--responses", resp, "--batch-size", 2).exit_code == 0
    assert len(calls) == 2, "only the two unfinished batches ran again"
    name = "revisions.jsonl"
    assert (broken / "revise" / name).read_bytes() == (whole / "revise" / name).read_bytes()
    # pairs hold absolute image paths, so the two runs differ exactly there
    a, b = ((d / "revise" / "pairs.jsonl").read_text() for d in (whole, broken))
    assert b == a.replace(str(whole.resolve()), str(broken.resolve())) and a != b


def test_unknown_prompt_id_names_file_and_line(world, tmp_path):
    run = _run(world, tmp_path)
    resp = tmp_path / "responses.jsonl"
    _responses(world, resp)
    lines = resp.read_text().splitlines()
    lines[2] = lines[2].replace('"prompt_id": "shapes_', '"prompt_id": "nope_')
    resp.write_text("\n".join(lines) + "\n")
    assert_one_error_line(cli("revise", "--run", run, "--responses", resp), f"{resp}:3", "nope_", "not in")
    assert not (run / "revise").exists()


def test_missing_images_are_skipped_and_counted_or_an_error_with_strict(world, tmp_path):
    run = _run(world, tmp_path)
    resp = tmp_path / "responses.jsonl"
    prompts = _responses(world, resp)
    (run / "data" / prompts[0].images[0]).unlink()
    assert_one_error_line(cli("revise", "--run", run, "--responses", resp, "--strict"),
                          prompts[0].id, "not found", "--strict")
    r = cli("revise", "--run", run, "--responses", resp)
    assert r.exit_code == 0, r.output
    rec = Run(run).read()["stages"]["revise"]
    assert rec["skipped"]["prompt images missing"] == 1
    assert rec["outputs"]["pairs"]["count"] == len(prompts) - 1


def test_bad_options_are_one_line(world, tmp_path):
    run = _run(world, tmp_path)
    resp = tmp_path / "responses.jsonl"
    _responses(world, resp)
    assert_one_error_line(cli("revise", "--run", run, "--responses", resp, "--judge", "gpt"), "--judge", "'gpt'")
    assert_one_error_line(cli("revise", "--run", run, "--responses", resp, "--method", "ppo"), "--method ppo")
    assert_one_error_line(cli("revise", "--run", run, "--responses", resp, "--option", "colour=red"),
                          "--option colour", "annotations")
    assert_one_error_line(cli("revise", "--run", run, "--responses", resp, "--option", "use_reference=maybe"),
                          "use_reference=maybe", "bool")
    assert_one_error_line(cli("revise", "--run", run, "--responses", resp, "--max-cost", 1),
                          "--max-cost", "annotations judge")
    assert_one_error_line(cli("revise", "--run", tmp_path / "empty"), "no finished rollout")


# --------------------------------------------------------------------------------------------------
# The openai judge against a real HTTP server on loopback


from tests.openai_server import FakeOpenAIServer, Raw, Reply, Status  # noqa: E402

FAST = ["--option", "backoff_s=0.01", "--option", "timeout_s=1.0", "--concurrency", 4]


def _report_reply(req) -> Reply:
    """The report a careful judge writes: 'giraffe'/'zebra' sentences removed, one sentence number it does
    not have (99, to be ignored), sentence 1 left out when there are four (counts as unchanged)."""
    body = json.loads(req.body["messages"][1]["content"][0]["text"])
    report = {"image_description": "shapes", "99": {"rewritten_content": "NEVER", "score": 1}}
    for k, sent in body["sentences"].items():
        if len(body["sentences"]) == 4 and k == "1":
            continue
        wrong = "giraffe" in sent or "zebra" in sent
        report[k] = {"copied_content": sent, "score": "2" if wrong else 4,
                     "error_type": "image_recognition_error" if wrong else "correct",
                     "object": ["giraffe -> none"] if wrong else [], "rewritten_content": "" if wrong else sent,
                     "reason": "r"}
    return Reply("```json\n" + json.dumps(report) + "\n```")


def _rewrite_reply(req) -> Reply:
    text = req.prompt.rsplit("The description:\n", 1)[1].strip()
    return Reply(json.dumps({"rewrites": [f"Variant {i}: {text}" for i in range(3)]}))


def _is_rewrite(req) -> bool:
    return "Rewrite a description" in req.prompt


def _faulty(req, seen):
    """30 % of distinct requests fail on their first try (429 + Retry-After, 500, 503, a timeout, a body that is
    not JSON); another 10 % first get a reply that is not the report (re-asked)."""
    digest = int(hashlib.sha256(json.dumps(req.body, sort_keys=True).encode()).hexdigest(), 16)
    good = _rewrite_reply(req) if _is_rewrite(req) else _report_reply(req)
    if seen == 0 and digest % 10 < 3:
        return [Status(429, {"Retry-After": "0.05"}), Status(500), Status(503), Reply(good.text, delay=1.5),
                Raw(b'{"choices": [tr')][digest % 5]
    if seen == 0 and digest % 10 == 3:
        return Reply("I am sorry, I cannot produce JSON today.")
    return good


import hashlib  # noqa: E402


@pytest.fixture
def key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-secret-123")


def _openai(run, resp, server, *extra):
    return cli("revise", "--run", run, "--responses", resp, "--judge", "openai", "--base-url", server.base_url,
               "--judge-model", "gpt-4o", *FAST, *extra)


def test_openai_judge_survives_30pct_failures_and_a_rerun_makes_no_calls(world, tmp_path, key):
    run = _run(world, tmp_path)
    resp = tmp_path / "responses.jsonl"
    prompts = _responses(world, resp)
    with FakeOpenAIServer() as server:
        server.respond(_faulty)
        r = _openai(run, resp, server, "--option", "prompt=ha-dpo", "--rewrites", 3)
        assert r.exit_code == 0, r.output
        first = len(server.requests)
        revs = read_records(run / "revise" / "revisions.jsonl", Revision)
        assert len(revs) == 2 * len(prompts) and not [v for v in revs if v.meta.get("failed")], "no item lost"
        pairs = read_records(run / "revise" / "pairs.jsonl", PreferencePair)
        assert [p.id for p in pairs] == [f"{p.id}#1" for p in prompts]
        by_id = {p.id: p for p in prompts}
        for pair in pairs:
            ref = by_id[pair.meta["prompt_id"]].reference
            assert pair.chosen == ref and pair.meta["method"] == "ha-dpo"
            assert pair.meta["chosen_variants"] == [f"Variant {i}: {ref}" for i in range(3)]
            assert pair.meta["rejected_variants"] == [f"Variant {i}: {pair.rejected}" for i in range(3)]
        rec = Run(run).read()["stages"]["revise"]
        usage = rec["usage"]
        assert usage["new_replies"] == first - usage["retries"] - usage["failed_requests"]
        bodies = {json.dumps(q.body, sort_keys=True) for q in server.requests}
        digests = [int(hashlib.sha256(b.encode()).hexdigest(), 16) % 10 for b in bodies]
        assert usage["retries"] == sum(d < 3 for d in digests) >= 0.2 * len(bodies), "each failure retried once"
        assert usage["failed_requests"] == 0
        reasked = [v for v in revs if v.meta["attempts"] > 1]
        assert reasked and all(v.meta["attempts"] == 2 for v in reasked), "an unreadable reply is asked again"
        assert "sk-test-secret-123" not in (run / "manifest.json").read_text()
        assert "sk-test-secret-123" not in (run / "revise" / "judge_cache.jsonl").read_text()

        # Another batch size restarts the stage: every verdict comes from the cache, no HTTP call.
        before = (run / "revise" / "revisions.jsonl").read_bytes()
        r = _openai(run, resp, server, "--option", "prompt=ha-dpo", "--rewrites", 3, "--batch-size", 5)
        assert r.exit_code == 0, r.output
        assert len(server.requests) == first, "a rerun makes zero calls"
        assert (run / "revise" / "revisions.jsonl").read_bytes() == before
        assert Run(run).read()["stages"]["revise"]["usage"]["http_requests"] == 0


def test_openai_report_numbers_are_read_against_our_sentences(world, tmp_path, key):
    run = _run(world, tmp_path)
    resp = tmp_path / "responses.jsonl"
    prompts = _responses(world, resp)
    p = prompts[0]
    four = f"{p.reference} It is drawn simply. A giraffe stands there. The end is near."
    resp.write_text(json.dumps(Response(id=f"{p.id}#0", prompt_id=p.id, sample=0, text=four, model="m").to_dict())
                    + "\n")
    with FakeOpenAIServer() as server:
        server.respond(lambda req, seen: _report_reply(req))
        r = _openai(run, resp, server, "--method", "opa-dpo")
        assert r.exit_code == 0, r.output
        sent = server.requests[0].body["messages"][1]["content"]
        assert sent[1]["image_url"]["url"].startswith("data:image/png;base64,"), "the image goes along (opa)"
    (rev,) = read_records(run / "revise" / "revisions.jsonl", Revision)
    # sentence 1 had no entry: unchanged, no score; 99 does not exist: ignored; the giraffe sentence is gone
    assert rev.text == f"{p.reference} It is drawn simply. The end is near." and "NEVER" not in rev.text
    assert [s["label"] for s in rev.sentences] == ["correct", "unjudged", "hallucinated", "correct"]
    (pair,) = read_records(run / "revise" / "pairs.jsonl", PreferencePair)
    assert pair.meta["revised"] == rev.text and pair.chosen == pair.meta["gt"] == p.reference
    assert [s["score"] for s in pair.meta["sentences_original"]] == [4, None, 2, 4]
    assert [s["score"] for s in pair.meta["sentences_revised"]] == [4, None, 4]


def test_openai_missing_key_fails_before_any_work(world, tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    run = _run(world, tmp_path)
    resp = tmp_path / "responses.jsonl"
    _responses(world, resp)
    with FakeOpenAIServer() as server:
        server.respond(lambda req, seen: _report_reply(req))
        assert_one_error_line(_openai(run, resp, server), "OPENAI_API_KEY")
        assert server.requests == [] and not (run / "revise").exists()


def test_openai_endpoint_that_refuses_stops_with_progress_kept(world, tmp_path, key):
    run = _run(world, tmp_path)
    resp = tmp_path / "responses.jsonl"
    prompts = _responses(world, resp)
    with FakeOpenAIServer() as server:
        server.respond(lambda req, seen: _report_reply(req) if len(server.requests) <= 4 else Status(503))
        r = _openai(run, resp, server, "--batch-size", 2, "--concurrency", 1, "--option", "max_attempts=2")
        assert_one_error_line(r, "failed after every retry", "HTTP 503", "rerun to resume")
        assert len((run / "revise" / "revisions.jsonl").read_text().splitlines()) == 4  # the first batch
        server.reset()
        server.respond(lambda req, seen: _report_reply(req))
        r = _openai(run, resp, server, "--batch-size", 2, "--concurrency", 1, "--option", "max_attempts=2")
        assert r.exit_code == 0, r.output
        assert len(server.requests) == 2 * len(prompts) - 4, "only what was not done is asked"
    with FakeOpenAIServer() as server:
        server.respond(lambda req, seen: Status(401, message="bad key sk-test-secret-123"))
        other = _run(world, tmp_path / "b")
        r = _openai(other, resp, server)
        assert_one_error_line(r, "HTTP 401", "OPENAI_API_KEY")
        assert "sk-test-secret-123" not in r.output


def test_openai_max_cost_stops_cleanly_and_resumes(world, tmp_path, key):
    run = _run(world, tmp_path)
    resp = tmp_path / "responses.jsonl"
    prompts = _responses(world, resp)
    with FakeOpenAIServer() as server:
        # 1000 prompt tokens per reply at 100 USD per million: 0.1 USD a reply
        server.respond(lambda req, seen: Reply(_report_reply(req).text, usage=(1000, 0)))
        args = ["--batch-size", 2, "--concurrency", 1, "--price", "100,100"]
        r = _openai(run, resp, server, *args, "--max-cost", 0.55)
        assert_one_error_line(r, "max cost 0.55 USD reached", "higher --max-cost")
        spent = len(server.requests)
        assert spent == 6  # 6 replies reach 0.6 USD >= 0.55; nothing more is sent
        rec = Run(run).read()["stages"]["revise"]
        assert rec["status"] == "failed" and rec["usage"]["cost_usd"] == pytest.approx(0.6)
        assert len((run / "revise" / "revisions.jsonl").read_text().splitlines()) == 4  # two whole batches
        r = _openai(run, resp, server, *args, "--max-cost", 100)
        assert r.exit_code == 0, r.output
        assert len(server.requests) == 2 * len(prompts), "the replies of the stopped batch came from the cache"


def test_ranked_pairs_take_the_judges_chosen_and_rejected():
    from hallu.pairs import build_pairs

    prompt = Prompt(id="p", images=["/img/a.png"], question="Describe.")
    resps = [Response(id=f"p#{i}", prompt_id="p", sample=i, text=f"answer {i}", model="m") for i in range(4)]
    other = Prompt(id="q", images=["/img/b.png"], question="Describe.")
    resps.append(Response(id="q#0", prompt_id="q", sample=0, text="only", model="m"))
    roles = {0: ("rejected", 1, 0.11), 1: ("chosen", 2, 0.30), 2: ("chosen", 1, 0.35), 3: (None, 3, 0.2)}
    revs = [Revision(id=f"p#{i}", response_id=f"p#{i}", text=f"answer {i}", judge="clip",
                     meta={"role": role, "rank": rank, "score": score, "min_score": 0.1} if role else
                     {"rank": rank, "score": score})
            for i, (role, rank, score) in roles.items()]
    revs.append(Revision(id="q#0", response_id="q#0", text="only", judge="clip", meta={"role": "chosen"}))
    pairs, skipped = build_pairs("clip-dpo", {"p": prompt, "q": other}, resps, revs)
    (pair,) = pairs
    # of two chosen candidates the better ranked (rank 1) wins
    assert (pair.id, pair.chosen, pair.rejected, pair.images) == ("p", "answer 2", "answer 0", ["/img/a.png"])
    assert pair.meta["chosen_judge"] == {"rank": 1, "score": 0.35, "min_score": 0.1}
    assert pair.meta["rejected_response"] == "p#0" and pair.meta["method"] == "clip-dpo"
    assert skipped == {"no chosen/rejected pair passed the judge's filters": 1}


def test_opa_pairs_load_in_the_dpo_trainer(world, tmp_path):
    from hallu.methods import get_method
    from hallu.train.dpo import load_pairs

    run = _run(world, tmp_path)
    resp = tmp_path / "responses.jsonl"
    prompts = _responses(world, resp)
    assert cli("revise", "--run", run, "--responses", resp, "--method", "opa-dpo").exit_code == 0
    spec = get_method("opa-dpo")
    loaded = load_pairs(run / "revise" / "pairs.jsonl", spec, spec.options())
    # every prompt's two answers make pairs; the trainer keeps those of the training images only
    train = [p for p in prompts if p.meta.get("split") in (None, "train")]
    assert 0 < len(train) < len(prompts)
    assert len(loaded) == 2 * len(train)
    assert all(p.meta["revised"] and p.meta["gt"] == p.chosen for p, _ in loaded)


# --------------------------------------------------------------------------------------------------
# MIA-DPO pairs: chosen = the reference, rejected = the attention judge's selected response


def _mia_revision(rid, *, rank=None, ppl=2.0, ratio=0.2, selected=True, reference="The reference."):
    meta = {"role": "rejected", "chosen": "reference", "dropped": None, "rank": rank, "perplexity": ppl,
            "ratio": ratio, "threshold": 0.8, "rule": "r <= 0.8", "format": "sequence", "layer": 1,
            "length_ratio": 1.0, "edit_distance": 0.5} if selected else {"role": None, "dropped": "attention ratio"}
    return Revision(id=rid, response_id=rid, text=reference if selected else "kept text", judge="attention",
                    prompt_version="attention-v1", meta=meta)


def _mia_world():
    prompts = {pid: Prompt(id=pid, images=[f"/img/{pid}.png"], question=f"What is in {pid}?",
                           reference=f"Reference of {pid}.") for pid in ("p", "q", "r", "s")}
    resps = [Response(id=f"{pid}#{k}", prompt_id=pid, sample=k, text=f"{pid} wrong answer {k}", model="m")
             for pid, n in (("p", 3), ("q", 1), ("r", 1), ("s", 1)) for k in range(n)]
    revs = [_mia_revision("p#0", rank=2, ppl=3.0, ratio=0.3, reference="Reference of p."),
            _mia_revision("p#1", rank=1, ppl=2.0, ratio=0.1, reference="Reference of p."),
            _mia_revision("p#2", selected=False),
            _mia_revision("q#0", rank=1, ppl=9.0, reference="Reference of q."),
            _mia_revision("r#0", selected=False),
            _mia_revision("s#0", rank=1, ppl=5.0, reference="Reference of s.")]
    return prompts, resps, revs


def test_mia_pairs_prefer_the_reference_over_the_top_ranked_selected_response():
    from hallu.pairs import build_pairs

    prompts, resps, revs = _mia_world()
    pairs, skipped = build_pairs("mia-dpo", prompts, resps, revs)
    assert [(p.id, p.prompt, p.chosen, p.rejected) for p in pairs] == [
        ("p", "What is in p?", "Reference of p.", "p wrong answer 1"),  # rank 1 of the two selected
        ("q", "What is in q?", "Reference of q.", "q wrong answer 0"),
        ("s", "What is in s?", "Reference of s.", "s wrong answer 0")]
    assert pairs[0].images == ["/img/p.png"]
    meta = pairs[0].meta
    assert (meta["method"], meta["response_id"], meta["gt"], meta["ratio"], meta["perplexity"], meta["format"],
            meta["rank"]) == ("mia-dpo", "p#1", "Reference of p.", 0.1, 2.0, "sequence", 1)
    assert "role" not in meta and "history" not in meta
    assert skipped == {"the attention judge selected no response of the prompt": 1,
                       "a lower-ranked selected sample of the same prompt": 1}


def test_mia_drop_top_perplexity_removes_the_most_perplexed_pairs():
    from hallu.pairs import build_pairs

    prompts, resps, revs = _mia_world()
    # three pairs (perplexities 2, 9, 5); p#0's 3.0 is not a pair, so it does not count
    pairs, skipped = build_pairs("mia-dpo", prompts, resps, revs, {"drop_top_perplexity": 0.34})
    assert [p.id for p in pairs] == ["p", "s"]  # floor(3 * 0.34) = 1: q (9.0) goes
    assert skipped["perplexity in the top 0.34 of the pairs (drop_top_perplexity)"] == 1
    pairs, _ = build_pairs("mia-dpo", prompts, resps, revs, {"drop_top_perplexity": 0.67})
    assert [p.id for p in pairs] == ["p"]  # floor(2.01) = 2: q (9.0) and s (5.0)
    pairs, _ = build_pairs("mia-dpo", prompts, resps, revs, {"drop_top_perplexity": 0.33})
    assert [p.id for p in pairs] == ["p", "q", "s"]  # floor(0.99) = 0


def _mia_inputs(world, tmp_path):
    """Two-image MIA sequence prompts (target image 1) from the shapes world, and one response each whose
    attention on the target is low (ratio 0.2, selected) or high (0.9, not), with perplexities 2..."""
    shapes = read_records(world / "data" / "prompts.jsonl", Prompt)[:4]
    prompts, rows = [], []
    for k, p in enumerate(shapes):
        images = [str((world / "data" / q.images[0]).resolve()) for q in (p, shapes[k - 1])]
        prompts.append(Prompt(id=p.id, images=images, question="Describe image 1.", reference=p.reference,
                              meta={"mia": {"format": "sequence", "target": 1, "n_images": 2}}))
        shares = [0.1, 0.4] if k != 2 else [0.45, 0.05]
        rows.append(Response(id=f"{p.id}#0", prompt_id=p.id, sample=0, text=f"Two dogs and a kite number {k}.",
                             model="m", meta={"attention": {"layer": 1, "image_tokens": [16, 16],
                                                            "image_shares": shares, "text_share": 0.5},
                                              "perplexity": 2.0 + k}))
    write_records(tmp_path / "mia_prompts.jsonl", prompts)
    write_records(tmp_path / "mia_responses.jsonl", rows)
    return prompts


def test_revise_attention_judge_builds_mia_pairs_and_drops_by_perplexity(world, tmp_path):
    prompts = _mia_inputs(world, tmp_path)
    run = _run(world, tmp_path)
    args = ("revise", "--run", run, "--responses", tmp_path / "mia_responses.jsonl", "--prompts",
            tmp_path / "mia_prompts.jsonl", "--judge", "attention")
    r = cli(*args)
    assert r.exit_code == 0, r.output
    pairs = read_records(run / "revise" / "pairs.jsonl", PreferencePair)
    # prompt 2 looked at its target image (0.45/16 of 0.5/16: ratio 0.9 > 0.8): no pair
    assert [p.id for p in pairs] == [prompts[k].id for k in (0, 1, 3)]
    for pair, k in zip(pairs, (0, 1, 3), strict=True):
        assert (pair.chosen, pair.rejected) == (prompts[k].reference, f"Two dogs and a kite number {k}.")
        assert pair.meta["ratio"] == pytest.approx(0.2) and pair.meta["perplexity"] == 2.0 + k
        assert pair.images == prompts[k].images and pair.prompt == "Describe image 1."
    assert Run(run).read()["stages"]["revise"]["outputs"]["pairs"]["method"] == "mia-dpo"
    # the fraction is a judge option, recorded with the stage: changing it rebuilds
    r = cli(*args, "--option", "drop_top_perplexity=0.5")
    assert r.exit_code == 0, r.output
    assert [p.id for p in read_records(run / "revise" / "pairs.jsonl", PreferencePair)] == [
        prompts[0].id, prompts[1].id]  # floor(3 * 0.5) = 1: the perplexity-5 pair goes
    assert_one_error_line(cli(*args, "--option", "drop_top_perplexity=1.0"), "drop_top_perplexity=1.0",
                          "[0, 1)")


# --------------------------------------------------------------------------------------------------
# Multi-turn: a later turn's answer is paired on that turn, the earlier turns in meta.history

TURNS = [{"role": "user", "text": "<image> What animal is this?"}, {"role": "assistant", "text": "A cat."},
         {"role": "user", "text": "What colour is it?"}]


def test_a_later_turns_pair_asks_that_turn_and_carries_the_history():
    from hallu.pairs import build_pairs
    from hallu.records import pair_to_trl

    prompt = Prompt(id="m", images=["/img/m.png"], question="<image> What animal is this?", reference="A cat.",
                    meta={"turns": TURNS})
    resps = [Response(id="m#0", prompt_id="m", sample=0, text="It is black and has a hat.", model="x",
                      meta={"turn": 1}),
             Response(id="m#1", prompt_id="m", sample=1, text="A cat with a hat.", model="x")]
    revs = [Revision(id="m#0", response_id="m#0", text="It is black.", judge="annotations"),
            Revision(id="m#1", response_id="m#1", text="A cat.", judge="annotations")]
    pairs, _ = build_pairs("dpo", {"m": prompt}, resps, revs)
    later, first = pairs
    assert (later.prompt, later.chosen, later.rejected) == ("What colour is it?", "It is black.",
                                                           "It is black and has a hat.")
    assert later.meta["turn"] == 1 and later.meta["history"] == TURNS[:2]
    assert first.prompt == prompt.question and "history" not in first.meta
    # the image is tagged in the first turn: the pair validates and reloads; TRL's prompt holds the conversation
    back = PreferencePair.from_dict(json.loads(json.dumps(later.to_dict())), "test")
    assert back.meta["history"] == TURNS[:2]
    msgs = pair_to_trl(back)["prompt"]
    assert [m["role"] for m in msgs] == ["user", "assistant", "user"]
    assert msgs[0]["content"] == [{"type": "image"}, {"type": "text", "text": "What animal is this?"}]
    assert msgs[2]["content"] == [{"type": "text", "text": "What colour is it?"}]
    # OPA: the reference answers the first turn, so the later turn's chosen is the revision, gt None
    opa, _ = build_pairs("opa-dpo", {"m": prompt}, resps, revs)
    assert (opa[0].chosen, opa[0].meta["gt"], opa[1].chosen) == ("It is black.", None, "A cat.")
    # a turn the prompt does not have names the response
    resps[0].meta["turn"] = 3
    with pytest.raises(HalluError, match=r"response 'm#0': answers user turn 3, but prompt 'm' has 2 user turns"):
        build_pairs("dpo", {"m": prompt}, resps, revs)


def test_yes_no_answers_pair_both_ways_so_the_pairs_follow_the_questions_not_the_mistakes():
    from hallu.judges import annotations
    from hallu.judges.base import JudgeGroup
    from hallu.pairs import build_pairs

    absent = Prompt(id="a", images=["x.png"], question="Is there a knife in the image?", reference="No",
                    objects=["fork"])
    present = Prompt(id="p", images=["x.png"], question="Is there a fork in the image?", reference="Yes",
                     objects=["fork"])
    responses = [Response(id="a#0", prompt_id="a", sample=0, text="Yes", model="m"),  # wrong: knife hallucinated
                 Response(id="p#0", prompt_id="p", sample=0, text="yes", model="m")]  # right
    groups = [JudgeGroup(absent, responses[:1], []), JudgeGroup(present, responses[1:], [])]
    revisions = [Revision.from_dict(r, "test") for r in annotations.judge_groups(groups, {"mode": "rewrite"})]
    prompts = {"a": absent, "p": present}
    for method in ("dpo", "ha-dpo", "opa-dpo"):
        pairs, skipped = build_pairs(method, prompts, responses, revisions)
        got = {p.meta["prompt_id"]: (p.chosen, p.rejected, p.meta.get("counterfactual", False)) for p in pairs}
        # the mistake: truth ≻ what was said; the right answer: itself ≻ its opposite, in its own casing
        want_right = ("Yes", "no", True) if method == "opa-dpo" else ("yes", "no", True)
        assert got == {"a": ("No", "Yes", False), "p": want_right}, method
        assert not skipped
    (opa,) = [p for p in build_pairs("opa-dpo", prompts, responses, revisions)[0] if p.meta["prompt_id"] == "p"]
    # the counterfactual side carries a wrong-answer report, so OPA's token weights mark it
    assert opa.meta["original"] == "no"
    assert opa.meta["sentences_original"] == [{"text": "no", "score": 2, "error_type": "image_recognition_error"}]
