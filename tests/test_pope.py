"""POPE parsers and scoring: every named parser reproduces its codebase, quirks included."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from hallu.commands import eval_pope
from hallu.data.pope import SPLITS
from hallu.errors import HalluError
from hallu.evals import pope as P

DATA = Path(__file__).parent / "data" / "pope"
LABELS = DATA / "pope_labels_realistic.jsonl"
ANSWERS = DATA / "pope_answers_realistic.jsonl"
EXPECTED = json.loads((DATA / "pope_expected_realistic.json").read_text())

# Which reference block each parser must reproduce.
REFERENCE = [
    ("aoidragon_pope_evaluate", "pope-official"),
    ("llava_eval_pope", "pope-official"),
    ("opera_pope_eval", "opera"),
    ("vcd_eval_pope", "vcd"),
    ("lmms_eval_pope", "lmms-eval"),
    ("vlmevalkit_pope", "vlmevalkit"),
]


def _realistic(parser):
    qs = P.load_questions([LABELS])
    answers = P.group_answers([P.read_answers(ANSWERS)], list(qs))
    return P.score(qs, answers, parser)


@pytest.mark.parametrize("block, parser", REFERENCE)
def test_reference_implementations(block, parser):
    expected = EXPECTED[block]
    result = _realistic(parser)
    (split,) = result["splits"].values()
    m = split["metrics"]
    preds = [item["pred"] for item in result["items"]]
    checked = 0
    for key, value in expected.items():
        if key == "per_item_pred":
            assert preds == value
        elif key == "per_item_score":
            assert [1.0 if i["pred"] == i["label"] else 0.0 for i in result["items"]] == value
        else:
            ours = m[key.lower()]
            # Exact: same operations in the same order give the same floats.
            assert ours == value and type(ours) is type(value), key
        checked += 1
    assert checked == len(expected) >= 5


def test_items_shape():
    result = _realistic("pope-official")
    first = result["items"][0]
    assert first == {"split": "pope_labels_realistic", "question_id": 1, "label": "no", "answer": "No",
                     "pred": "no"}
    assert result["benchmark"] == "pope" and result["parser"] == "pope-official"
    s = result["settings"]
    assert s["parser"] == "pope-official" and s["parser_version"] == P.PARSER_VERSION
    assert s["questions"]["pope_labels_realistic"]["count"] == 200
    assert s["questions"]["pope_labels_realistic"]["digest"].startswith("sha256:")
    assert result["mean"]["f1"] == result["splits"]["pope_labels_realistic"]["metrics"]["f1"]
    assert "pooled" not in result


# --------------------------------------------------------------------------------------------------
# Hand-checked tables of tricky answers


TRICKY = ["Yes.", "No, there is not.", "There is no dog", "I cannot tell", "yes, but…", "NO", "no\n", "Nope",
          "2.5", "", "No!", '"No"', "Not at all", "There isn't", "Yes. No.", "No.\n", "no\tdog", "no", "No",
          "I can't tell", "yes and no", "**Yes**", "Yes, there is no dog."]

TABLE = {
    #  answer                 official  opera   vlmevalkit  strict
    "Yes.":                  ("yes", "yes", "Yes", "yes"),
    "No, there is not.":     ("no", "no", "No", "no"),
    "There is no dog":       ("no", "no", "No", "unknown"),
    "I cannot tell":         ("yes", "yes", "Unknown", "unknown"),
    "yes, but…":             ("yes", "yes", "Yes", "unknown"),
    "NO":                    ("yes", "no", "No", "no"),
    "no\n":                  ("yes", "yes", "No", "no"),
    "Nope":                  ("yes", "yes", "Unknown", "unknown"),
    "2.5":                   ("yes", "yes", "Unknown", "unknown"),
    "":                      ("yes", "yes", "Unknown", "unknown"),
    "No!":                   ("yes", "yes", "No", "no"),
    '"No"':                  ("yes", "yes", "No", "no"),
    "Not at all":            ("yes", "yes", "Unknown", "unknown"),
    "There isn't":           ("yes", "no", "Unknown", "unknown"),
    "Yes. No.":              ("yes", "no", "Unknown", "unknown"),
    "No.\n":                 ("no", "yes", "No", "no"),
    "no\tdog":               ("yes", "yes", "No", "no"),
    "no":                    ("no", "no", "No", "no"),
    "No":                    ("no", "no", "No", "no"),
    "I can't tell":          ("yes", "no", "Unknown", "unknown"),
    "yes and no":            ("no", "no", "Unknown", "unknown"),
    "**Yes**":               ("yes", "yes", "Unknown", "yes"),  # "*" is not in VLMEvalKit's list
    "Yes, there is no dog.": ("no", "no", "Unknown", "unknown"),
}


@pytest.mark.parametrize("answer", TRICKY)
def test_tricky_answers(answer):
    official, opera, vlm, strict = TABLE[answer]
    assert P.parse_answer(answer, "pope-official") == official
    assert P.parse_answer(answer, "opera") == opera
    assert P.parse_answer(answer, "vlmevalkit") == vlm
    assert P.parse_answer(answer, "strict") == strict
    assert P.parse_answer(answer, "lmms-eval") == answer.lower().strip()


@pytest.mark.parametrize("answer, expected", [
    ("Yes, there is a cat in the image.", "yes"),
    ("No dogs here.", "no"),
    ("  'no'  ", "no"),
    ("“Yes”", "yes"),
    ("No, but there is a cat.", "unknown"),  # hedged, even if the hedge is about another object
    ("Yes, maybe.", "unknown"),
    ("Yesterday", "unknown"),
    ("Answer: yes", "unknown"),
    ("yes-ish", "yes"),
])
def test_strict_more(answer, expected):
    assert P.parse_answer(answer, "strict") == expected


@pytest.mark.parametrize("label, answer, pred", [
    ("yes", "Yes.", "yes"), ("yes", "eyes", "yes"), ("yes", "YES!", "yes"), ("yes", "No", "no"),
    ("yes", "", "no"), ("no", "snow", "no"), ("no", "Not really", "no"), ("no", "I don't know", "no"),
    ("no", "Yes", "yes"), ("no", "", "yes"),
])
def test_vcd_substring_rules(label, answer, pred):
    assert P.parse_answer(answer, "vcd", label) == pred


@pytest.mark.parametrize("text, expected", [
    ("a-b", "a b"),               # not next to a space: replaced by a space
    ("a - b", "a  b"),            # next to a space somewhere: deleted everywhere
    ("3,5 (x)", "35 x"),          # a digit-comma-digit anywhere: every listed mark deleted
    ("yes.5", "yes.5"),           # a period before a digit stays
    ("5. yes", "5 yes"),          # after a digit it goes (the "(?!<=" typo never looks behind)
    ("no" + "." * 32, "no"),
    ("no" + "." * 40, "no" + "." * 8),  # only 32 periods are deleted (re.UNICODE passed as count)
])
def test_vlmevalkit_process_punctuation(text, expected):
    assert P.vlmevalkit_process_punctuation(text) == expected


@pytest.mark.parametrize("answer, pred", [
    ("Yes!No", "Unknown"), ("Yes,no", "Unknown"), ("1,000 no!", "No"), ("no" + "." * 33, "Unknown"),
    ("5. yes", "Yes"), ("YES", "Yes"),
])
def test_vlmevalkit_extraction(answer, pred):
    assert P.parse_answer(answer, "vlmevalkit") == pred


def test_unknown_parser():
    with pytest.raises(HalluError, match="unknown POPE parser 'x'"):
        P.parse_answer("yes", "x")
    with pytest.raises(HalluError, match="choose one of"):
        P.score({"s": [P.Question(1, "a", "q", "yes")]}, {"s": {1: "yes"}}, "x")


# --------------------------------------------------------------------------------------------------
# Metrics edge cases


def _qs(labels, split="s"):
    text = "Is there a dog in the image?"
    return {split: [P.Question(i + 1, "im.jpg", text, lab) for i, lab in enumerate(labels)]}


def _answers(texts, split="s"):
    return {split: {i + 1: t for i, t in enumerate(texts)}}


def test_zero_division_never_crashes():
    labels = ["yes", "no", "yes", "no"]
    texts = ["No", "No", "No", "No"]
    r = P.score(_qs(labels), _answers(texts), "pope-official")
    m = r["splits"]["s"]["metrics"]
    assert m["precision"] is None and m["f1"] is None and m["recall"] == 0.0
    assert m["accuracy"] == 0.5 and m["yes_ratio"] == 0.0
    assert any("precision undefined" in n for n in r["splits"]["s"]["notes"])
    assert r["mean"]["precision"] is None and any("mean precision" in n for n in r["notes"])
    for parser in ("opera", "vcd", "strict"):
        m = P.score(_qs(labels), _answers(texts), parser)["splits"]["s"]["metrics"]
        assert m["precision"] is None and m["f1"] is None, parser
    # lmms-eval and VLMEvalKit guard their divisions with 0.
    for parser in ("lmms-eval", "vlmevalkit"):
        m = P.score(_qs(labels), _answers(texts), parser)["splits"]["s"]["metrics"]
        assert m["precision"] == 0.0 and m["recall"] == 0.0 and m["f1"] == 0.0, parser
    m = P.score(_qs(["no", "no"]), _answers(["Yes", "No"]), "pope-official")["splits"]["s"]["metrics"]
    assert m["recall"] is None and m["precision"] == 0.0 and m["f1"] is None


def test_strict_metrics_by_hand():
    labels = ["yes", "yes", "yes", "no", "no", "no"]
    texts = ["Yes", "I cannot tell", "No", "No.", "Yes", "maybe"]
    m = P.score(_qs(labels), _answers(texts), "strict")["splits"]["s"]["metrics"]
    # tp 1, fn 1, unknown-on-yes 1; tn 1, fp 1, unknown-on-no 1
    assert (m["tp"], m["fp"], m["tn"], m["fn"], m["unknown"]) == (1, 1, 1, 1, 2)
    assert m["accuracy"] == 2 / 6 and m["unknown_ratio"] == 2 / 6
    assert m["precision"] == 0.5 and m["recall"] == 1 / 3  # an unknown on a yes-question is a miss
    assert m["f1"] == 2 * 0.5 * (1 / 3) / (0.5 + 1 / 3) and m["yes_ratio"] == 2 / 6


def test_lmms_yes_ratio_is_ground_truth_share():
    m = P.score(_qs(["yes", "no", "no", "no"]), _answers(["no", "no", "no", "no"]), "lmms-eval")
    m = m["splits"]["s"]["metrics"]
    assert m["yes_ratio"] == 0.25 and m["accuracy"] == 0.75


def test_vcd_denominators():
    m = P.score(_qs(["yes", "no", "no", "yes"]), _answers(["eyes", "nothing", "Sure", "Nah"]), "vcd")
    m = m["splits"]["s"]["metrics"]
    assert (m["tp"], m["tn"], m["fp"], m["fn"]) == (1, 1, 1, 1)
    assert m["accuracy"] == 0.5 and m["yes_ratio"] == 0.5 and m["unknown_ratio"] == 0.0


def test_mean_and_pooled_over_splits():
    qs = {**_qs(["yes", "no"], "a"), **_qs(["yes", "no", "yes", "no"], "b")}
    ans = {**_answers(["Yes", "Yes"], "a"), **_answers(["Yes", "No", "No", "No"], "b")}
    r = P.score(qs, ans, "pope-official")
    a, b = r["splits"]["a"]["metrics"], r["splits"]["b"]["metrics"]
    assert r["mean"]["accuracy"] == (a["accuracy"] + b["accuracy"]) / 2 == (0.5 + 0.75) / 2
    assert "tp" not in r["mean"]
    assert r["pooled"]["tp"] == 2 and r["pooled"]["accuracy"] == 4 / 6
    assert [i["split"] for i in r["items"]] == ["a", "a", "b", "b", "b", "b"]
    r = P.score(qs, ans, "vlmevalkit")
    f1a, f1b = (r["splits"][s]["metrics"]["f1_pct"] for s in "ab")
    assert r["mean"]["f1_pct"] == (f1a + f1b) / 2


# --------------------------------------------------------------------------------------------------
# Alignment and files


def test_ids_mismatch_is_reported():
    qs = _qs(["yes"] * 6)
    with pytest.raises(HalluError) as e:
        P.score(qs, {"s": {1: "y", 2: "y", 3: "y", 4: "y", 7: "y"}})
    msg = str(e.value)
    assert "split s" in msg and "2 of 6 questions have no answer (ids 5, 6)" in msg
    assert "1 answers match no question (ids 7)" in msg
    with pytest.raises(HalluError, match=r"12 of 12 questions have no answer \(ids 1, 2, 3, 4, 5, \.\.\.\)"):
        P.score(_qs(["no"] * 12), {"s": {100: "no"}})
    with pytest.raises(HalluError, match="split s: no answers"):
        P.score(_qs(["no"]), {"s": {}})
    with pytest.raises(HalluError, match="unknown splits: t"):
        P.score(_qs(["no"]), {"s": {1: "no"}, "t": {1: "no"}})


def test_ids_match_as_strings():
    r = P.score(_qs(["yes"]), {"s": {"1": "Yes"}})
    assert r["items"][0]["question_id"] == 1 and r["items"][0]["pred"] == "yes"


def _write(path, text):
    path.write_text(text, encoding="utf-8", newline="")
    return path


def test_question_file_formats(tmp_path):
    rows = [{"question_id": 1, "image": "a.jpg", "text": "Is there a dog in the image?", "label": "yes"},
            {"question_id": 2, "image": "a.jpg", "text": "Is there a cat in the image?", "label": "NO "}]
    crlf = _write(tmp_path / "coco_pope_random.json", "".join(json.dumps(r) + "\r\n" for r in rows))
    arr = _write(tmp_path / "gqa_pope_seem_random.json", json.dumps(rows, indent=2))
    one = _write(tmp_path / "one.jsonl", json.dumps(rows[0]) + "\n")
    qs = P.load_questions([crlf, arr, one])
    assert list(qs) == ["coco_pope_random", "gqa_pope_seem_random", "one"]
    assert qs["coco_pope_random"] == qs["gqa_pope_seem_random"]
    assert [q.label for q in qs["coco_pope_random"]] == ["yes", "no"]
    assert len(qs["one"]) == 1


_Q1 = '{"question_id": 1, "image": "a", "text": "t", "label": "no"}\n'


@pytest.mark.parametrize("content, message", [
    (_Q1 + "[1, 2]\n", r"q\.jsonl:2: expected an object"),
    ('{"question_id": 1, "image": "a", "text": "t"}\n', r"q\.jsonl:1: not a POPE question \(missing label\)"),
    ('{"question_id": 1, "image": "a", "text": "t", "label": "maybe"}\n', r"q\.jsonl:1: label must be"),
    ('{"question_id": 1.5, "image": "a", "text": "t", "label": "no"}\n', r"q\.jsonl:1: question_id must be"),
    (_Q1 + _Q1.replace('"a"', '"b"'), r"q\.jsonl:2: duplicate question_id 1"),
    (_Q1 + "not json\n", r"q\.jsonl:2: not valid JSON"),
    ("", r"q\.jsonl: no questions"),
    ('"just a string"', r"q\.jsonl: expected JSONL or a JSON array"),
])
def test_question_file_errors(tmp_path, content, message):
    f = _write(tmp_path / "q.jsonl", content)
    with pytest.raises(HalluError, match=message) as e:
        P.load_questions([f])
    assert "\n" not in str(e.value)


def test_same_stem_twice(tmp_path):
    (tmp_path / "x").mkdir()
    a = _write(tmp_path / "q.jsonl", '{"question_id": 1, "image": "a", "text": "t", "label": "no"}\n')
    b = _write(tmp_path / "x" / "q.json", '{"question_id": 1, "image": "a", "text": "t", "label": "no"}\n')
    with pytest.raises(HalluError, match="second question file named 'q'"):
        P.load_questions([a, b])


@pytest.mark.parametrize("content, message", [
    ("", r"a\.jsonl: no answers in the file"),
    ('{"question": "q", "answer": "yes"}\n', r"a\.jsonl:1: no question_id .*never by line order"),
    ('{"question_id": 1, "text": "Yes", "answer": "no"}\n', r"a\.jsonl:1: 'text' and 'answer' differ"),
    ('{"question_id": 1, "prediction": "Yes"}\n', r"a\.jsonl:1: no answer"),
    ('{"question_id": 1, "text": null}\n', r"a\.jsonl:1: the answer must be a string"),
    ('{"question_id": 1, "text": "a"}\n{"question_id": 1, "text": "b"}\n', r"a\.jsonl:2: duplicate answer"),
])
def test_answer_file_errors(tmp_path, content, message):
    f = _write(tmp_path / "a.jsonl", content)
    with pytest.raises(HalluError, match=message):
        P.read_answers(f)


def test_answer_key(tmp_path):
    f = _write(tmp_path / "a.jsonl", '{"question_id": 1, "text": "Yes", "answer": "no"}\n')
    assert P.read_answers(f, "text")[0].text == "Yes"
    assert P.read_answers(f, "answer")[0].text == "no"
    with pytest.raises(HalluError, match="no field 'pred'"):
        P.read_answers(f, "pred")
    arr = _write(tmp_path / "b.json", json.dumps([{"question_id": 3, "answer": "No"}]))
    assert P.read_answers(arr)[0] == P.Answer(3, "No", None, f"{arr}: record 1")


def test_group_answers(tmp_path):
    a = [P.Answer(1, "yes", None, "f:1")]
    b = [P.Answer(1, "no", "b", "g:1")]
    assert P.group_answers([a, b], ["x", "y"]) == {"x": {"1": "yes"}, "y": {"1": "no"}}
    one = [P.Answer(1, "yes", "x", "f:1"), P.Answer(1, "no", "y", "f:2")]
    assert P.group_answers([one], ["x", "y"]) == {"x": {"1": "yes"}, "y": {"1": "no"}}
    with pytest.raises(HalluError, match=r"f:1: no 'split' field"):
        P.group_answers([a], ["x", "y"])
    with pytest.raises(HalluError, match=r"g:1: split 'b' is not one of the question files \(x, y\)"):
        P.group_answers([b], ["x", "y"])
    with pytest.raises(HalluError, match="2 answers files for 3 question files"):
        P.group_answers([a, b], ["x", "y", "z"])
    with pytest.raises(HalluError, match="a second answer for question_id 1"):
        P.group_answers([one], ["s"])


def test_request_text():
    q = P.Question(1, "a.jpg", "Is there a dog in the image?", "yes")
    assert P.request_text(q) == "Is there a dog in the image?"
    assert P.request_text(q, P.ANSWER_SUFFIXES["llava"]) == (
        "Is there a dog in the image?\nAnswer the question using a single word or phrase.")
    assert P.request_text(q, P.ANSWER_SUFFIXES["vcd"]) == (
        "Is there a dog in the image? Please answer this question with one word.")
    msgs = P.request_messages(q)
    assert msgs == [{"role": "user", "content": [{"type": "image"},
                                                  {"type": "text", "text": "Is there a dog in the image?"}]}]


# --------------------------------------------------------------------------------------------------
# The command


def _app():
    app = typer.Typer()
    app.command()(eval_pope.pope)
    return app


def _one_error_line(res, *parts):
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), res.stderr
    for part in parts:
        assert part in lines[0], lines[0]


def test_cli_realistic(tmp_path):
    out = tmp_path / "r.json"
    res = CliRunner().invoke(_app(), ["--questions", str(LABELS), "--answers", str(ANSWERS),
                                      "--json", str(out), "--parser", "vlmevalkit"])
    assert res.exit_code == 0, res.output
    assert "accuracy" in res.stdout and "71.92" in res.stdout
    saved = json.loads(out.read_text())
    direct = _realistic("vlmevalkit")
    assert saved["splits"] == direct["splits"] and saved["items"] == direct["items"]
    q = saved["settings"]["questions"]["pope_labels_realistic"]
    assert q["file"] == str(LABELS) and q["sha256"].startswith("sha256:")
    assert saved["settings"]["answers"][0]["file"] == str(ANSWERS)


def _split_files(tmp_path):
    questions = [json.loads(x) for x in LABELS.read_text().splitlines()]
    answers = [json.loads(x) for x in ANSWERS.read_text().splitlines()]
    qfiles, afiles, combined = [], [], []
    for i, split in enumerate(SPLITS):
        part = slice(60 * i, 60 * (i + 1))
        renumbered = [dict(r, question_id=j + 1) for j, r in enumerate(questions[part])]
        q = _write(tmp_path / f"coco_pope_{split}.json", "".join(json.dumps(r) + "\n" for r in renumbered))
        rows = [{"question_id": j + 1, "text": r["text"]} for j, r in enumerate(answers[part])]
        a = _write(tmp_path / f"answers_{split}.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        combined += [dict(r, split=f"coco_pope_{split}") for r in rows]
        qfiles.append(q)
        afiles.append(a)
    one = _write(tmp_path / "answers_all.jsonl", "".join(json.dumps(r) + "\n" for r in combined))
    return qfiles, afiles, one


def test_cli_several_splits(tmp_path):
    qfiles, afiles, one = _split_files(tmp_path)
    qargs = [x for f in qfiles for x in ("--questions", str(f))]
    paired = tmp_path / "paired.json"
    res = CliRunner().invoke(_app(), [*qargs, *[x for f in afiles for x in ("--answers", str(f))],
                                      "--json", str(paired)])
    assert res.exit_code == 0, res.output
    assert "random" in res.stdout and "mean" in res.stdout and "pooled" in res.stdout
    single = tmp_path / "single.json"
    res = CliRunner().invoke(_app(), [*qargs, "--answers", str(one), "--json", str(single)])
    assert res.exit_code == 0, res.output
    a, b = json.loads(paired.read_text()), json.loads(single.read_text())
    assert a["splits"] == b["splits"] and a["mean"] == b["mean"]
    assert list(a["splits"]) == ["coco_pope_random", "coco_pope_popular", "coco_pope_adversarial"]
    # The pooled official metrics over all 180 items equal those of the realistic file's first 180.
    assert a["pooled"]["tp"] + a["pooled"]["fn"] == sum(s["yes"] for s in a["splits"].values())


def test_cli_errors(tmp_path):
    qfiles, afiles, _ = _split_files(tmp_path)
    bad = _write(tmp_path / "short.jsonl", "".join(
        json.dumps({"question_id": j, "text": "Yes"}) + "\n" for j in range(1, 59)))
    res = CliRunner().invoke(_app(), ["--questions", str(qfiles[0]), "--answers", str(bad)])
    _one_error_line(res, "coco_pope_random", "short.jsonl", "2 of 60 questions have no answer (ids 59, 60)")
    res = CliRunner().invoke(_app(), ["--questions", str(qfiles[0]), "--answers", str(afiles[0]),
                                      "--parser", "x"])
    _one_error_line(res, "--parser x: unknown")
    res = CliRunner().invoke(_app(), ["--questions", str(qfiles[0])])
    _one_error_line(res, "--answers is required")
    empty = _write(tmp_path / "empty.jsonl", "")
    res = CliRunner().invoke(_app(), ["--questions", str(qfiles[0]), "--answers", str(empty)])
    _one_error_line(res, "empty.jsonl: no answers in the file")
    res = CliRunner().invoke(_app(), [*[x for f in qfiles for x in ("--questions", str(f))],
                                      "--answers", str(afiles[0])])
    _one_error_line(res, "no 'split' field")


# --------------------------------------------------------------------------------------------------
# Official answer formats: POPE's own {question, answer} files, concatenated JSON objects


def _official_answers(tmp_path, name="official.jsonl", edit=None):
    """The realistic answers in POPE's own layout: {"question", "answer"} in question order, no ids."""
    questions = [json.loads(x) for x in LABELS.read_text().splitlines()]
    answers = {json.loads(x)["question_id"]: json.loads(x)["text"] for x in ANSWERS.read_text().splitlines()}
    rows = [{"question": q["text"], "answer": answers[q["question_id"]]} for q in questions]
    if edit:
        rows = edit(rows)
    return _write(tmp_path / name, "".join(json.dumps(r) + "\n" for r in rows))


def test_official_answers_align_by_position_after_checking_texts(tmp_path):
    # Whitespace differences in the echoed question are not a mismatch.
    f = _official_answers(tmp_path, edit=lambda rows: [dict(r, question="  " + r["question"].replace(" ", "  ") + "\n")
                                                        for r in rows])
    qs = P.load_questions([LABELS])
    (split,) = qs
    read = P.read_answers(f, questions=qs[split], questions_source=str(LABELS))
    assert [a.question_id for a in read] == [q.question_id for q in qs[split]]
    assert read[0].where == f"{f}:1" and read[0].split is None
    by_position = P.score(qs, P.group_answers([read], [split]), "pope-official")
    by_id = _realistic("pope-official")
    assert by_position["items"] == by_id["items"] and by_position["splits"] == by_id["splits"]


def test_official_answers_through_the_cli(tmp_path):
    f = _official_answers(tmp_path)
    out = tmp_path / "r.json"
    res = CliRunner().invoke(_app(), ["--questions", str(LABELS), "--answers", str(f), "--json", str(out),
                                      "--parser", "vlmevalkit"])
    assert res.exit_code == 0, res.output
    assert json.loads(out.read_text())["items"] == _realistic("vlmevalkit")["items"]


def test_official_answers_mismatch_names_file_line_and_both_texts(tmp_path):
    def swap(rows):
        rows[6], rows[7] = rows[7], rows[6]
        return rows

    f = _official_answers(tmp_path, edit=swap)
    questions = [json.loads(x) for x in LABELS.read_text().splitlines()]
    res = CliRunner().invoke(_app(), ["--questions", str(LABELS), "--answers", str(f)])
    # Line 7 holds question 8's text: the first mismatch is reported, naming both texts.
    _one_error_line(res, f"{f}:7:", "answer 7", repr(questions[7]["text"]), repr(questions[6]["text"]),
                    str(LABELS))


@pytest.mark.parametrize("edit, message", [
    (lambda rows: rows[:-2], r"198 answers for the 200 questions .* question 199 has none"),
    (lambda rows: rows + [rows[0]], r"official\.jsonl:201: answer 201, but .* has only 200 questions"),
    (lambda rows: [dict(rows[0], question_id=1)] + rows[1:],
     r"official\.jsonl:2: no question_id, unlike the records before it"),
])
def test_official_answers_count_and_layout_errors(tmp_path, edit, message):
    f = _official_answers(tmp_path, edit=edit)
    qs = P.load_questions([LABELS])["pope_labels_realistic"]
    with pytest.raises(HalluError, match=message):
        P.read_answers(f, questions=qs, questions_source=str(LABELS))


def test_official_answers_need_their_own_question_file(tmp_path):
    # One id-less answers file for several question files cannot be aligned: said in one line.
    qfiles, _, _ = _split_files(tmp_path)
    f = _write(tmp_path / "pos.jsonl", json.dumps({"question": "Is there a dog?", "answer": "yes"}) + "\n")
    res = CliRunner().invoke(_app(), [*[x for q in qfiles for x in ("--questions", str(q))], "--answers", str(f)])
    _one_error_line(res, "pos.jsonl:1: no question_id", "one per question file")


def _stream(rows, sep):
    return sep.join(json.dumps(r, indent=2) for r in rows) + "\n"


@pytest.mark.parametrize("sep", ["", "\n", "\r\n"])
def test_concatenated_pretty_printed_objects(tmp_path, sep):
    qrows = [json.loads(x) for x in LABELS.read_text().splitlines()]
    arows = [json.loads(x) for x in ANSWERS.read_text().splitlines()]
    q = _write(tmp_path / "pope_labels_realistic.json", _stream(qrows, sep))
    a = _write(tmp_path / "answers.json", _stream(arows, sep))
    qs = P.load_questions([q])
    assert qs == P.load_questions([LABELS])
    answers = P.read_answers(a)
    # Each record is located at the line its object starts on.
    lines_per_object = json.dumps(arows[0], indent=2).count("\n") + (1 if sep else 0)
    assert answers[1].where == f"{a}:{1 + lines_per_object}"
    result = P.score(qs, P.group_answers([answers], list(qs)), "opera")
    assert result["items"] == _realistic("opera")["items"]


def test_concatenated_objects_bad_json_names_its_line(tmp_path):
    rows = [{"question_id": i, "text": "Yes"} for i in (1, 2)]
    f = _write(tmp_path / "a.json", _stream(rows, "") + '{\n  "question_id": 3,\n  "text": Yes\n}')
    text = f.read_text()
    bad_line = text[: text.index("Yes\n}")].count("\n") + 1
    with pytest.raises(HalluError, match=rf"a\.json:{bad_line}: not valid JSON"):
        P.read_answers(f)


# --------------------------------------------------------------------------------------------------
# One parser registry, one result shape


def test_one_parser_registry():
    from hallu.evals import pope_metrics, pope_parsers

    assert list(P.PARSERS) == ["pope-official", "opera", "vcd", "lmms-eval", "vlmevalkit", "strict"]
    assert P.PARSERS is pope_parsers.PARSERS and set(pope_metrics.METRICS) == set(P.PARSERS)
    assert P.PARSERS["opera"]("There isn't", None) == "no" and P.PARSERS["pope-official"]("There isn't", None) == "yes"
    with pytest.raises(HalluError, match="vcd parser needs the question's label"):
        P.parse_answer("yes", "vcd")


def test_score_only_result_is_an_eval_result(tmp_path):
    from hallu.records import EvalResult, read_eval_result

    out = tmp_path / "r.json"
    res = CliRunner().invoke(_app(), ["--questions", str(LABELS), "--answers", str(ANSWERS), "--json", str(out)])
    assert res.exit_code == 0, res.output
    loaded = read_eval_result(out)
    assert isinstance(loaded, EvalResult) and loaded.benchmark == "pope" and loaded.missing_settings() == []
    assert loaded.to_dict() == json.loads(out.read_text())  # it round-trips
    s = loaded.settings
    assert s["parser"] == "pope-official" and s["request"] is None and s["model_fingerprint"] is None
    assert s["inputs"]["questions:pope_labels_realistic"]["sha256"] == s["questions"]["pope_labels_realistic"]["sha256"]
    assert s["inputs"]["answers:0"]["path"] == str(ANSWERS)
    split = loaded.splits["pope_labels_realistic"]
    assert loaded.metrics == loaded.mean and loaded.metrics["accuracy"] == split["metrics"]["accuracy"]
    assert split["count"] == 200 and len(loaded.items) == 200


# --------------------------------------------------------------------------------------------------
# Option typos are refused before any model loads or anything is written


@pytest.mark.parametrize("extra, message", [
    (["--mode", "generat"], "--mode generat: unknown; choose one of generate, choice"),
    (["--answer-suffix", "llava2"], "--answer-suffix llava2: unknown; choose one of none, llava, vcd"),
    (["--parser", "oficial"], "--parser oficial: unknown"),
    (["--dtype", "fp16"], "--dtype fp16: choose one of auto, float32, bfloat16, float16"),
    (["--attn", "flash"], "--attn flash: choose one of"),
])
def test_option_typos_fail_before_anything(tmp_path, extra, message):
    out = tmp_path / "run"
    # The model folder does not even exist: the typo must be found first.
    res = CliRunner().invoke(_app(), ["--model", str(tmp_path / "no-model"), "--questions", str(LABELS),
                                      "--images", str(tmp_path), "--out", str(out), *extra])
    _one_error_line(res, message)
    assert not out.exists(), "nothing may be written for a typo"


def test_option_typos_fail_before_anything_in_chair_and_shr(tmp_path):
    from hallu.commands import app

    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["eval", "chair", "--model", str(tmp_path / "m"), "--images", str(tmp_path),
                                   "--coco-annotations", str(tmp_path), "--out", str(out), "--unknown-images", "skip"])
    _one_error_line(res, "--unknown-images skip: unknown; choose one of error, empty")
    res = CliRunner().invoke(app, ["eval", "shr", "--model", str(tmp_path / "m"), "--images", str(tmp_path),
                                   "--vg", str(tmp_path), "--out", str(out), "--no-judge", "--dtype", "half"])
    _one_error_line(res, "--dtype half: choose one of")
    assert not out.exists()
