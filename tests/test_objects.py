"""CHAIR's word machinery (hallu.objects) against outputs of the official code's libraries.

Reference files (tests/data/chair/) hold what nltk 3.2.5 ``word_tokenize`` and Pattern 3.6
``singularize`` returned, and what the official ``caption_to_words`` returned, for the same inputs.
The extra expectations written inline below were produced by running nltk 3.2.5 and Pattern 3.6.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from hallu import objects as O

DATA = Path(__file__).parent / "data" / "chair"
SINGULAR = json.loads((DATA / "singularize_reference.json").read_text(encoding="utf-8"))["singularize"]
TOKENS = json.loads((DATA / "tokenization_reference.json").read_text(encoding="utf-8"))["items"]
DEV = json.loads((DATA / "dev_expected.json").read_text(encoding="utf-8"))["sentences"]


def test_reference_sizes():
    assert len(SINGULAR) == 1014
    assert len(TOKENS) == 136
    assert len(DEV) == 15


@pytest.mark.parametrize("word", sorted(SINGULAR))
def test_singularize_matches_pattern_3_6(word):
    assert O.singularize(word) == SINGULAR[word]


@pytest.mark.parametrize(
    "word, expected",
    [
        ("bus", "bu"), ("buses", "bus"), ("glasses", "glass"), ("glass", "glas"), ("ties", "ty"),
        ("TIES", "Ty"), ("tennis", "tenni"), ("sports", "sport"), ("skis", "ski"), ("this", "thi"),
        ("was", "wa"), ("is", "is"), ("four", "fmy"), ("your", "ymy"), ("hours", "hour"),
        ("safari", "safarus"), ("police", "polouse"), ("mothers-in-law", "mother-in-law"),
        ("dogs'", "dog's"), ("'", "'s"), ("''", "'s's"), ("analyses", "analysis"), ("bases", "basis"),
        ("theses", "thesis"), ("octopi", "octopus"), ("oxens", "oxs"), ("mice", "mouse"),
        ("wolves", "wolf"), ("Wolves", "Wolf"), ("knives", "knife"), ("leaves", "leaf"),
        ("heroes", "hero"), ("quizzes", "quiz"), ("matrices", "matrix"), ("cookies", "cookies"),
        ("boxes", "box"), ("people", "person"), ("women", "woman"), ("children", "child"),
        ("teeth", "tooth"), ("geese", "goose"), ("iPhones", "iPhone"), ("", ""),
    ],
)
def test_singularize_quirks(word, expected):
    assert O.singularize(word) == expected


@pytest.mark.parametrize("case", TOKENS, ids=[f"t{i}" for i in range(len(TOKENS))])
def test_tokenization_matches_nltk_3_2_5(case):
    assert O.tokenize_caption(case["text"]) == case["tokens_nltk_3_2_5_py27"]


def test_tokenizer_keeps_3_2_5_quotes_not_current_nltk():
    # The one text on which nltk 3.2.5 and 3.10 differ: 3.2.5 leaves a leading ' and backticks attached.
    case = next(c for c in TOKENS if "backticks" in c["text"])
    assert case["tokens_nltk_3_2_5_py27"] != case["tokens_nltk_3_10_4_py311"]
    assert O.tokenize_caption(case["text"]) == case["tokens_nltk_3_2_5_py27"]


@pytest.mark.parametrize(
    "text, sentences, tokens",
    [
        ("Two dogs. Three cats.", ["Two dogs.", "Three cats."], ["Two", "dogs", ".", "Three", "cats", "."]),
        ("mr. smith has a dog. he walks.", ["mr. smith has a dog.", "he walks."],
         ["mr.", "smith", "has", "a", "dog", ".", "he", "walks", "."]),
        ("(a dog.) a cat.", ["(a dog.)", "a cat."], ["(", "a", "dog", ".", ")", "a", "cat", "."]),
        ("a dog... a cat", ["a dog... a cat"], ["a", "dog", "...", "a", "cat"]),
        ("it is 3. a dog", ["it is 3. a dog"], ["it", "is", "3.", "a", "dog"]),
        ("u.s. dogs are big. the end", ["u.s. dogs are big.", "the end"],
         ["u.s.", "dogs", "are", "big", ".", "the", "end"]),
        ('a dog!"  a cat?', ['a dog!"', "a cat?"], ["a", "dog", "!", "''", "a", "cat", "?"]),
        ("a dog.\n\na cat.", ["a dog.", "a cat."], ["a", "dog", ".", "a", "cat", "."]),
        ("j. smith walks. k. jones runs.", ["j. smith walks.", "k. jones runs."],
         ["j.", "smith", "walks", ".", "k.", "jones", "runs", "."]),
        ("a. dog", ["a. dog"], ["a.", "dog"]),
        ("", [], []),
    ],
)
def test_sentences_and_words(text, sentences, tokens):
    # Expected values from nltk 3.2.5 (PunktSentenceTokenizer with the English parameters, word_tokenize).
    assert O.split_sentences(text) == sentences
    assert O.word_tokenize(text) == tokens


def test_treebank_contractions_and_punctuation():
    text = "i cannot go, gonna wanna 'tis dogs' toys (maybe) [x] {y} <z> a--b 10,000 $5 50% me@x #tag a & b"
    assert O.word_tokenize(text) == [
        "i", "can", "not", "go", ",", "gon", "na", "wan", "na", "'t", "is", "dogs", "'", "toys", "(", "maybe",
        ")", "[", "x", "]", "{", "y", "}", "<", "z", ">", "a", "--", "b", "10,000", "$", "5", "50", "%", "me",
        "@", "x", "#", "tag", "a", "&", "b",
    ]  # fmt: skip


def test_lowercase_as_python_2():
    # Python 3 lowers "İ" to two characters and a final "Σ" to "ς"; the official code (Python 2) did not.
    assert O.tokenize_caption("İSTANBUL ΣΑΣ") == ["istanbul", "σασ"]


@pytest.mark.parametrize("exp", DEV, ids=[f"dev{s['key']}" for s in DEV])
def test_caption_to_words_matches_official(exp):
    words = O.get_matcher().caption_to_words(exp["caption"])
    assert words.merged == exp["processed_words"]
    assert words.surface == exp["mscoco_words"]
    assert words.nodes == exp["mscoco_generated_words"]
    assert words.idxs == exp["object_idxs"]
    surface, nodes, idxs, merged = words  # the official 4-tuple order
    assert (surface, nodes, idxs, merged) == (words.surface, words.nodes, words.idxs, words.merged)


def test_synonym_table_is_the_reference_table_verbatim():
    m = O.get_matcher()
    ref = (DATA / "synonyms.txt").read_bytes()
    assert m.digest == "sha256:" + hashlib.sha256(ref).hexdigest()
    assert len(m.categories) == 80
    assert sum(len(r) for r in m.rows) == 416
    assert len(m.objects) == 403
    assert m.categories[0] == "person" and m.categories[-1] == "toothbrush"
    # Double spaces in the file leave two entries with a leading space.
    assert " motor bike" in m.objects and " cheesecake" in m.objects
    assert m.node_of("sofa") == "couch" and m.node_of("lion") is None
    assert O.get_matcher() is m  # loaded once


@pytest.mark.parametrize(
    "caption, nodes",
    [
        ("A man rides a motor bike.", ["person"]),  # " motor bike" has a leading space: never found
        ("A cheesecake and an iPhone.", []),  # " cheesecake"; "iPhone" is never lower case
        ("A train on the train tracks.", ["train"]),  # "train track" blocks the second train
        ("A passenger train and passengers.", ["train", "person"]),
        ("A baby elephant and a baby.", ["elephant", "person"]),
        ("A baby animal near an adult cub.", []),  # blockers: not object names
        ("A man in a bow tie.", ["person", "tie"]),
        ("Two men wearing ties.", ["person"]),  # ties -> "ty"
        ("A toilet seat.", ["toilet"]),
        ("A seat and a chair.", ["chair", "chair"]),
        ("Two wine glasses and a glass.", ["wine glass"]),  # glass -> "glas"
        ("A stove top oven.", ["oven", "oven"]),  # three words never merge
        ("A bus and two buses.", ["bus"]),
        ("A tennis racket and a tennis ball.", ["tennis racket", "sports ball"]),
        ("A hot-dog and a hot dog.", ["hot dog"]),
        ("Two dogs and a dog.", ["dog", "dog"]),
        ("People at home plate.", ["person"]),
        ("", []),
    ],
)
def test_rules(caption, nodes):
    assert O.node_words(caption) == nodes


def test_seat_rule_shifts_indices_like_the_official_code():
    words = O.get_matcher().caption_to_words("The seat of the toilet and a sink.")
    assert words.merged == ["the", "seat", "of", "the", "toilet", "and", "a", "sink", "."]
    assert words.surface == ["toilet", "sink"]
    # True positions are 4 and 7; the official code reports positions in the list without "seat".
    assert words.idxs == [3, 6]


def test_merge_records_first_token_index():
    m = O.get_matcher()
    merged, starts = m.merge(["a", "hot", "dog", "and", "a", "baby", "cat"])
    assert merged == ["a", "hot dog", "and", "a", "cat"]
    assert starts == [0, 1, 3, 4, 5]


def test_matcher_from_custom_table():
    m = O.ObjectMatcher("dog, puppy\ncat, kitten\n")
    assert m.categories == ["dog", "cat"]
    assert m.caption_to_words("Two puppies and a kitten.").nodes == ["dog", "cat"]


def test_import_is_cheap():
    code = (
        "import sys, hallu.objects as o\n"
        "heavy = [m for m in ('torch', 'transformers', 'nltk', 'pycocotools', 'numpy') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "assert o._punkt.cache_info().currsize == 0 and o.get_matcher.cache_info().currsize == 0\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
