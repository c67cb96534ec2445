"""The offline annotations judge: hallucinated objects out, OPA-style sentence report in."""

import json

import pytest

from hallu.data import shapes
from hallu.judges import annotations as A
from hallu.judges.base import JudgeGroup
from hallu.objects import node_words
from hallu.records import Prompt, Response


def _group(prompt, *texts):
    return JudgeGroup(prompt, [Response(id=f"{prompt.id}#{i}", prompt_id=prompt.id, sample=i, text=t, model="m")
                               for i, t in enumerate(texts)], [])


PARTY = Prompt(id="p", images=["x.png"], question="Describe this image in detail.",
               reference="The image shows a cake, a pizza and a bottle.", objects=["bottle", "pizza", "cake"])


def test_remove_drops_exactly_the_sentences_with_missing_objects():
    text = "The image shows a cake and two knives. A fork is near the pizza. The bottle is yellow."
    (rev,) = A.judge_groups([_group(PARTY, text)], {"mode": "remove"})
    assert rev["id"] == rev["response_id"] == "p#0"
    assert rev["text"] == "The bottle is yellow."
    assert [s["label"] for s in rev["sentences"]] == ["hallucinated", "hallucinated", "correct"]
    assert [s["objects"] for s in rev["sentences"]] == [["knife"], ["fork"], []]
    assert rev["meta"]["removed_objects"] == ["fork", "knife"]
    # OPA's report: 2 / image_recognition_error for a wrong object, 4 / correct otherwise.
    assert [(s["score"], s["error_type"]) for s in rev["meta"]["sentences_original"]] == [
        (2, "image_recognition_error"), (2, "image_recognition_error"), (4, "correct")]
    assert rev["meta"]["sentences_revised"] == [{"text": "The bottle is yellow.", "score": 4, "error_type": "correct"}]


def test_rewrite_swaps_a_wrong_object_for_an_unmentioned_true_one_keeping_number():
    prompt = Prompt(id="q", images=["x.png"], question="Describe.", objects=["pizza", "knife", "cup"])
    (rev,) = A.judge_groups([_group(prompt, "A fork is near the pizza. There are two hot dogs.")],
                            {"mode": "rewrite", "use_reference": False})
    # unused true objects in sorted order: cup, knife; wrong ones in order of mention: fork, hot dog
    assert rev["text"] == "A cup is near the pizza. There are two knives."
    assert rev["meta"]["replaced_objects"] == [["fork", "cup"], ["hot dog", "knife"]]
    assert rev["sentences"][0]["objects"] == ["fork -> cup"]
    assert rev["meta"]["removed_objects"] == []
    assert rev["meta"]["sentences_revised"][1] == {"text": "There are two knives.", "score": 2,
                                                    "error_type": "image_recognition_error"}


def test_rewrite_without_spare_true_objects_removes():
    (rev,) = A.judge_groups([_group(PARTY, "A cake, a pizza and a bottle. A fork too.")], {"mode": "rewrite"})
    assert rev["text"] == "A cake, a pizza and a bottle."
    assert rev["meta"]["removed_objects"] == ["fork"]


def test_synonyms_and_reference_count_as_present():
    prompt = Prompt(id="r", images=["x.png"], question="Describe.", reference="A man rides a motorbike.",
                    objects=["person"])
    (rev,) = A.judge_groups([_group(prompt, "A man on a motorcycle. The men wave.")], {})
    assert rev["text"] == "A man on a motorcycle. The men wave." and rev["meta"]["changed"] is False
    (rev,) = A.judge_groups([_group(prompt, "A man on a motorcycle.")], {"use_reference": False})
    assert rev["text"] == "" and rev["meta"]["removed_objects"] == ["motorcycle"]


def test_bad_options_name_the_option():
    with pytest.raises(Exception, match="--mode 'erase'"):
        A.check({"mode": "erase"})
    with pytest.raises(Exception, match="colour"):
        A.check({"colour": 1})


@pytest.mark.parametrize("mode", A.MODES)
def test_shapes_world_no_hallucinated_object_survives(tmp_path, mode):
    shapes.build_world(tmp_path, n_images=30, seed=1)
    lines = (tmp_path / "prompts.jsonl").read_text().splitlines()
    prompts = [Prompt.from_dict(json.loads(x), "prompts") for x in lines]
    names = [c.name for c in shapes.CATEGORIES]
    groups, injected, first = [], {}, {}

    def texts_first_absent(p, rev):
        return rev["meta"]["hallucinated"] == [first[p.id]]
    for k, p in enumerate(prompts):
        absent = [n for n in names if n not in p.objects]
        a, b = absent[k % len(absent)], absent[(3 * k + 1) % len(absent)]
        texts = [p.reference, f"{p.reference} There is also a {a} next to two {b}s.",
                 f"A {a} in the top left corner. {p.meta['detailed_reference']}"]
        groups.append(_group(p, *texts))
        injected[p.id] = {a, b}
        first[p.id] = a
    revs = A.judge_groups(groups, {"mode": mode})
    assert len(revs) == 3 * len(prompts)
    by_id = {r["id"]: r for r in revs}
    changed = 0
    for p in prompts:
        truth = A.ground_truth(p)
        assert set(p.objects) <= truth
        for i in range(3):
            rev = by_id[f"{p.id}#{i}"]
            assert set(node_words(rev["text"])) <= truth, (p.id, rev["text"])
            changed += rev["meta"]["changed"]
            if i == 0:  # the clean reference is kept word for word
                assert rev["text"] == p.reference and not rev["meta"]["hallucinated"]
            elif i == 1:
                assert set(rev["meta"]["hallucinated"]) == injected[p.id]
            else:
                assert texts_first_absent(p, rev)
    assert changed == 2 * len(prompts)
