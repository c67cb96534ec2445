"""Records: validation with file:line, round trips, TRL export, imports; shards: torn-line resume."""

import json

import pytest

from hallu.errors import HalluError
from hallu.fileio import read_json_or_jsonl
from hallu.records import (
    PreferencePair,
    Prompt,
    Response,
    export_pairs_trl,
    pair_from_external,
    read_records,
    user_content,
    write_records,
)
from hallu.shards import JsonlShard


def _lines(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_prompt_round_trip(tmp_path):
    p = Prompt(id="a", images=["i/1.png"], question="Describe.", reference="a dog .", objects=["dog"],
               regions=[{"x": 1, "y": 2, "width": 3, "height": 4, "phrase": "a dog"}], meta={"k": 1})
    path = tmp_path / "p.jsonl"
    assert write_records(path, [p]) == 1
    assert read_records(path, Prompt) == [p]


@pytest.mark.parametrize(
    "line, message",
    [
        ("not json", r"p\.jsonl:2: not valid JSON"),
        ('{"images": [], "question": "q"}', r"p\.jsonl:2: prompt record is missing the field 'id'"),
        ('{"id": "b", "images": "x.png", "question": "q"}',
         r"p\.jsonl:2: field 'images' must be a list of strings, got str"),
        ('{"id": "b", "images": [], "question": 3}', r"p\.jsonl:2: field 'question' must be a string, got int"),
        ('[1, 2]', r"p\.jsonl:2: expected a JSON object for a prompt record, got list"),
        ('{"id": "a", "images": [], "question": "q"}', r"p\.jsonl:2: duplicate id 'a' \(first on line 1\)"),
        ('{"id": "b", "images": ["x.png"], "question": "<image> and <image>"}',
         r"p\.jsonl:2: question has 2 <image> tags but 1 images"),
    ],
)
def test_bad_prompt_lines_name_file_and_line(tmp_path, line, message):
    path = _lines(tmp_path / "p.jsonl", [{"id": "a", "images": [], "question": "q"}, line])
    with pytest.raises(HalluError, match=message):
        read_records(path, Prompt)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(HalluError, match=r"nope\.jsonl: file not found"):
        read_records(tmp_path / "nope.jsonl", Prompt)
    with pytest.raises(HalluError, match=r"is a directory"):
        read_records(tmp_path, Prompt)


def test_user_content_places_images():
    assert user_content("Describe.", 2) == [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Describe."}]
    assert user_content("<image> left, <image> right: which?", 2) == [
        {"type": "image"}, {"type": "text", "text": "left,"}, {"type": "image"},
        {"type": "text", "text": "right: which?"}]


def test_pairs_export_to_trl_conversational_vision_format(tmp_path):
    pair = PreferencePair(id="p1", images=["img/a.png"], prompt="Describe the image.", chosen="A dog.",
                          rejected="A dog and a cat.")
    pairs = tmp_path / "pairs.jsonl"
    write_records(pairs, [pair])
    out = tmp_path / "trl.jsonl"
    assert export_pairs_trl(pairs, out) == 1
    row = json.loads(out.read_text())
    assert row == {
        "id": "p1",
        "images": [str(tmp_path / "img/a.png")],
        "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}],
        "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "A dog."}]}],
        "rejected": [{"role": "assistant", "content": [{"type": "text", "text": "A dog and a cat."}]}],
    }


def test_import_llava_and_llama_factory_styles():
    llava = {"id": 7, "image": "a.jpg", "conversations": [{"from": "human", "value": "<image>\nWhat is it?"}],
             "chosen": "A cat.", "rejected": "A dog."}
    p = pair_from_external(llava, "x.json:1", 0)
    assert (p.id, p.images, p.prompt, p.chosen, p.rejected) == ("7", ["a.jpg"], "What is it?", "A cat.", "A dog.")
    lf = {"conversations": [{"from": "human", "value": "<image><image>Same object?"}],
          "chosen": {"from": "gpt", "value": "Yes."}, "rejected": {"from": "gpt", "value": "No."},
          "images": ["a.jpg", "b.jpg"]}
    p = pair_from_external(lf, "y.json:3", 3)
    assert (p.id, p.images, p.prompt, p.chosen) == ("3", ["a.jpg", "b.jpg"], "<image><image>Same object?", "Yes.")
    with pytest.raises(HalluError, match=r"y\.json:4: prompt has 1 <image> tags but 2 images"):
        pair_from_external({**lf, "conversations": [{"from": "human", "value": "<image>x"}]}, "y.json:4", 4)
    with pytest.raises(HalluError, match=r"z:1: missing the field 'rejected'"):
        pair_from_external({"prompt": "q", "chosen": "a", "image": "i"}, "z:1", 0)


def test_response_ids():
    assert Response.make_id("coco-12", 3) == "coco-12#3"


def test_read_json_or_jsonl(tmp_path):
    (tmp_path / "a.json").write_text('[{"x": 1}]')
    assert read_json_or_jsonl(tmp_path / "a.json") == ("json", [{"x": 1}])
    (tmp_path / "b.jsonl").write_text('{"x": 1}\n{"x": 2}\n')
    assert read_json_or_jsonl(tmp_path / "b.jsonl") == ("jsonl", [(1, {"x": 1}), (2, {"x": 2})])
    (tmp_path / "c.jsonl").write_text('{"x": 1}\n{"x": \n')
    with pytest.raises(HalluError, match=r"c\.jsonl:2: not valid JSON"):
        read_json_or_jsonl(tmp_path / "c.jsonl")


def test_shard_drops_a_torn_last_line_and_resumes(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text('{"id": "a"}\n{"id": "b"}\n{"id": "c", "te')
    shard = JsonlShard(path)
    assert shard.open() == ["a", "b"]
    shard.append([{"id": "c", "text": "x"}])
    shard.close()
    assert path.read_text() == '{"id": "a"}\n{"id": "b"}\n{"id": "c", "text": "x"}\n'


def test_shard_corrupt_middle_line_is_an_error(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text('{"id": "a"}\ngarbage\n{"id": "c"}\n')
    with pytest.raises(HalluError, match=r"out\.jsonl:2: corrupt line in a stage output"):
        JsonlShard(path).open()


def test_shard_fresh_sets_the_old_output_aside(tmp_path, capsys):
    path = tmp_path / "out.jsonl"
    path.write_text('{"id": "a"}\n')
    shard = JsonlShard(path)
    assert shard.open(fresh=True) == []
    shard.close()
    assert path.read_text() == ""
    assert (tmp_path / "out.previous-1.jsonl").read_text() == '{"id": "a"}\n'
    note = f"note: {path} was made with other options or inputs; kept it as out.previous-1.jsonl\n"
    assert capsys.readouterr().err == note
    # A second change keeps the first superseded output too, under the next number.
    path.write_text('{"id": "b"}\n')
    with JsonlShard(path) as shard:
        shard.open(fresh=True)
    assert (tmp_path / "out.previous-1.jsonl").read_text() == '{"id": "a"}\n'
    assert (tmp_path / "out.previous-2.jsonl").read_text() == '{"id": "b"}\n'
    assert "kept it as out.previous-2.jsonl" in capsys.readouterr().err
