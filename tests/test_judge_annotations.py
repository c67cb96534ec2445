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


def test_yes_no_answers_are_judged_by_the_asked_object_and_revised_to_the_truth():
    ask = Prompt(id="y", images=["x.png"], question="Is there a knife in the image?", reference="No",
                 objects=["fork", "spoon"])
    yes, no, free = A.judge_groups([_group(ask, "Yes", "no", "A fork and a spoon.")], {"mode": "rewrite"})
    # "Yes" about an absent knife: the knife is hallucinated; the revision answers the truth, same casing.
    assert yes["text"] == "No" and yes["meta"]["changed"] is True
    assert yes["meta"]["hallucinated"] == ["knife"] and yes["sentences"][0]["objects"] == ["knife"]
    assert yes["meta"]["answer"] == {"object": "knife", "said": "yes", "truth": "no"}
    assert yes["meta"]["sentences_original"] == [{"text": "Yes", "score": 2, "error_type": "image_recognition_error"}]
    assert no["text"] == "no" and no["meta"]["changed"] is False and no["meta"]["hallucinated"] == []
    # An answer that is neither yes nor no is read as free text, as before.
    assert free["text"] == "A fork and a spoon." and "answer" not in free["meta"]
    present = Prompt(id="z", images=["x.png"], question="Is there a fork in the image?", objects=["fork"])
    (miss,) = A.judge_groups([_group(present, "No.")], {})
    assert miss["text"] == "Yes" and miss["meta"]["hallucinated"] == [] and miss["meta"]["changed"] is True
    assert miss["meta"]["answer"]["truth"] == "yes"
    # Not a yes/no question (or about two objects): judged by its mentions.
    assert A.asked_object("Describe the knife.", _matcher()) is None
    assert A.asked_object("Is there a knife or a fork in the image?", _matcher()) is None


def _matcher():
    from hallu.objects import get_matcher

    return get_matcher()


def test_rewrite_deletes_a_wrong_list_item_when_no_true_object_is_left_to_swap_in():
    prompt = Prompt(id="l", images=["x.png"], question="Describe.", objects=["fork", "spoon"])
    (tail, head, two) = A.judge_groups([_group(prompt, "The image shows a fork, a spoon and a knife.",
                                               "The image shows a knife, a fork and a spoon.",
                                               "The image shows a bowl and a knife. A fork is red.")],
                                       {"mode": "rewrite", "use_reference": False})
    assert tail["text"] == "The image shows a fork and a spoon."
    assert tail["meta"]["removed_objects"] == ["knife"] and tail["meta"]["replaced_objects"] == []
    assert head["text"] == "The image shows a fork and a spoon."
    # Nothing true left in the list: the sentence goes, the clean one stays.
    assert two["text"] == "A fork is red."
    (rm,) = A.judge_groups([_group(prompt, "The image shows a fork, a spoon and a knife.")],
                           {"mode": "remove", "use_reference": False})
    assert rm["text"] == ""  # remove mode drops the whole sentence, as documented
