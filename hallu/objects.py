"""Finding COCO object mentions in text, exactly as the official CHAIR code does.

This is the word machinery of CHAIR (Rohrbach et al. 2018; LisaAnne/Hallucination@6e4d33c4
``utils/chair.py``), shared by ``hallu.evals.chair`` and the offline ``annotations`` judge. The
official ``caption_to_words`` does, in order:

1. ``nltk.word_tokenize(caption.lower())`` under nltk 3.2.5: Punkt sentence splitting with NLTK's
   English parameters, then the Penn Treebank regex tokenizer on each sentence. Only a sentence's
   final period is split off ("tree." -> "tree", "."), ``'s`` is split, hyphenated words stay whole
   ("hot-dog" is not a hot dog), and nltk 3.2.5 does not split a leading ``'`` or backtick.
2. Pattern 3.6 ``singularize`` on *every* token, whatever its part of speech. Its rules have well-known
   slips that the official numbers contain: "bus" -> "bu" (a singular bus is never detected),
   "glass" -> "glas", "ties" -> "ty", "tennis" -> "tenni", "his" -> "hi", "slice" -> "slouse".
3. A left-to-right merge of adjacent token pairs through a fixed table (27 COCO double words, "baby X"
   / "adult X" -> X for 12 animal words, "passenger jet/train", and the overrides "bow tie" -> tie,
   "toilet seat" -> toilet, "wine glas" -> wine glass). A merged pair that is not an object name
   ("train track", "home plate", "baby animal") still swallows both tokens, so it blocks them.
4. If the merged list holds both "toilet" and "seat", every "seat" is dropped ("the seat of the
   toilet" is not a chair).
5. Tokens found in the synonym table are the surface words; each maps to its category's node word.

The indices returned for the kept words are original-token positions looked up by position in the
*post-seat-filter* list, so they are shifted after a dropped "seat": that quirk is kept on purpose.

Everything here runs offline from assets shipped in ``hallu.data`` (``chair/synonyms.txt`` and the
Punkt parameters ``chair/punkt_english.json``); nltk and Pattern are not needed. The tokenizer and
``singularize`` are our own implementations of the documented rules, checked word for word against
outputs of nltk 3.2.5 and Pattern 3.6 (tests/data/chair/). Python 2 details that change results are
reproduced: the Treebank regexes, Punkt's numeric-token test and its boundary realignment were not
Unicode-aware (``\\d``, ``\\s`` and ``\\b`` mean ASCII only), and ``unicode.lower()`` lowered one
character at a time ("İ" -> "i", no final sigma).
"""

from __future__ import annotations

import functools
import re
from typing import NamedTuple

__all__ = [
    "CaptionWords",
    "ObjectMatcher",
    "get_matcher",
    "node_words",
    "singularize",
    "split_sentences",
    "tokenize_caption",
    "word_tokenize",
]

NORMALISER = "pattern-3.6"
TOKENIZER = "nltk-3.2.5-word_tokenize"


def _asset_text(name: str) -> str:
    from importlib.resources import files

    return files("hallu.data").joinpath("chair", name).read_text(encoding="utf-8")


# --------------------------------------------------------------------------------------------------
# Punkt sentence splitting (the tokenize-only path of nltk 3.2.5's PunktSentenceTokenizer)
# --------------------------------------------------------------------------------------------------

# Orthographic-context flags as stored in the trained parameters: where a word type was seen with an
# upper- or lower-case first letter (sentence-initially, internally, or unknown).
_BEG_UC, _MID_UC, _UNK_UC, _BEG_LC, _MID_LC, _UNK_LC = (1 << k for k in range(1, 7))
_ANY_UC = _BEG_UC | _MID_UC | _UNK_UC
_ANY_LC = _BEG_LC | _MID_LC | _UNK_LC

_END_CHARS = ".?!"
_NO_START_PUNCT = frozenset(";:,.!?")  # a sentence never starts with one of these
_NON_WORD = r"""(?:[?!)";}\]*:@'({\[])"""  # characters that cannot sit inside a Punkt word
_MULTI_PUNCT = r"(?:-{2,}|\.{2,}|(?:\.\s){2,}\.)"  # dashes, ellipses, ". . ."
_WORD_START = r"""[^("`{\[:;&#*@)}\]\-,]"""  # characters a word may not start with

# A Punkt "word": a multi-char punctuation mark, or a run of non-space characters ended (lazily) by
# space, end, non-word punctuation, multi-char punctuation or a word-final comma, or else any single
# non-space character. Periods stay attached to the word before them.
_PUNKT_WORD = re.compile(
    rf"{_MULTI_PUNCT}"
    rf"|(?={_WORD_START})\S+?(?=\s|$|{_NON_WORD}|{_MULTI_PUNCT}|,(?=$|\s|{_NON_WORD}|{_MULTI_PUNCT}))"
    r"|\S"
)
# A candidate boundary: some word material ending in . ? or !, followed either by non-word punctuation
# or by whitespace and a next token (captured so the next sentence can start there).
_PERIOD_CONTEXT = re.compile(rf"\S*[{re.escape(_END_CHARS)}](?=(?P<after>{_NON_WORD}|\s+(?P<next>\S+)))")
# Closing punctuation after a boundary belongs to the sentence before it. Not Unicode-aware in
# Python 2 (compiled without re.UNICODE), hence ASCII.
_REALIGN = re.compile(r"""["')\]}]+?(?:\s+|(?=--)|$)""", re.MULTILINE | re.ASCII)
# Python 2 compiled these without re.UNICODE: digits are ASCII digits.
_NUMERIC = re.compile(r"^-?[.,]?[0-9][0-9,.\-]*\.?$")
_INITIAL = re.compile(r"[^\W\d]\.$")
_ELLIPSIS = re.compile(r"\.\.+$")


class _PunktToken:
    __slots__ = ("tok", "type", "period_final", "sentbreak", "abbr", "ellipsis")

    def __init__(self, tok: str):
        self.tok = tok
        # Numbers share one type so that "3." behaves like any other number before a period.
        self.type = _NUMERIC.sub("##number##", tok.lower())
        self.period_final = tok.endswith(".")
        self.sentbreak = False
        self.abbr = False
        self.ellipsis = False

    def type_no_period(self) -> str:
        t = self.type
        return t[:-1] if len(t) > 1 and t[-1] == "." else t

    def type_no_sentperiod(self) -> str:
        return self.type_no_period() if self.sentbreak else self.type

    def first_upper(self) -> bool:
        return self.tok[0].isupper()

    def first_lower(self) -> bool:
        return self.tok[0].islower()

    def is_initial(self) -> bool:
        return _INITIAL.match(self.tok) is not None


class _Punkt:
    """Sentence boundaries from trained Punkt parameters (no training, tokenize path only)."""

    def __init__(self, params: dict):
        self.abbrevs = frozenset(params["abbrev_types"])
        self.collocations = frozenset((a, b) for a, b in params["collocations"])
        self.starters = frozenset(params["sent_starters"])
        self.ortho = dict(params["ortho_context"])

    # -- token annotation ---------------------------------------------------------------------------
    def _tokens(self, text: str) -> list[_PunktToken]:
        # Lines are tokenized one by one: "$" ends a word at a line end and ". . ." cannot span lines.
        out = []
        for line in text.split("\n"):
            if line.strip():
                out.extend(_PunktToken(t) for t in _PUNKT_WORD.findall(line))
        return out

    def _first_pass(self, t: _PunktToken) -> None:
        tok = t.tok
        if tok in (".", "?", "!"):
            t.sentbreak = True
        elif _ELLIPSIS.match(tok):
            t.ellipsis = True
        elif t.period_final and not tok.endswith(".."):
            stem = tok[:-1].lower()
            if stem in self.abbrevs or stem.split("-")[-1] in self.abbrevs:
                t.abbr = True
            else:
                t.sentbreak = True

    def _looks_sentence_initial(self, t: _PunktToken) -> bool | None:
        """Orthographic evidence that ``t`` starts a sentence: True, False, or None (unknown)."""
        if t.tok in _NO_START_PUNCT:
            return False
        ctx = self.ortho.get(t.type_no_sentperiod(), 0)
        if t.first_upper() and ctx & _ANY_LC and not ctx & _MID_UC:
            return True
        if t.first_lower() and (ctx & _ANY_UC or not ctx & _BEG_LC):
            return False
        return None

    def _second_pass(self, t1: _PunktToken, t2: _PunktToken) -> None:
        # Only period-final tokens are reconsidered, in the light of the token after them.
        if not t1.period_final:
            return
        typ = t1.type_no_period()
        next_typ = t2.type_no_sentperiod()
        initial = t1.is_initial()
        if (typ, next_typ) in self.collocations:
            t1.sentbreak, t1.abbr = False, True
            return
        if (t1.abbr or t1.ellipsis) and not initial:
            if self._looks_sentence_initial(t2) is True:
                t1.sentbreak = True
                return
            if t2.first_upper() and next_typ in self.starters:
                t1.sentbreak = True
                return
        if initial or typ == "##number##":
            starts = self._looks_sentence_initial(t2)
            if starts is False:
                t1.sentbreak, t1.abbr = False, True
                return
            if starts is None and initial and t2.first_upper() and not self.ortho.get(next_typ, 0) & _ANY_LC:
                t1.sentbreak, t1.abbr = False, True

    def _has_inner_break(self, context: str) -> bool:
        """True when some token other than the last one of ``context`` ends a sentence."""
        toks = self._tokens(context)
        for t in toks:
            self._first_pass(t)
        # Left to right, each token is revised looking at its successor's first-pass state only.
        for t1, t2 in zip(toks, toks[1:], strict=False):
            self._second_pass(t1, t2)
            if t1.sentbreak:
                return True
        return False

    # -- slicing ------------------------------------------------------------------------------------
    def spans(self, text: str) -> list[tuple[int, int]]:
        raw = []
        start = 0
        for m in _PERIOD_CONTEXT.finditer(text):
            if self._has_inner_break(m.group() + m.group("after")):
                raw.append((start, m.end()))
                start = m.start("next") if m.group("next") else m.end()
        raw.append((start, len(text.rstrip())))
        # Move closing quotes/brackets that follow a boundary back into the sentence they close.
        out = []
        shift = 0
        for k, (s, e) in enumerate(raw):
            s += shift
            if k + 1 == len(raw):
                if s < e:
                    out.append((s, e))
                continue
            ns, ne = raw[k + 1]
            m = _REALIGN.match(text, ns, ne)
            if m:
                out.append((s, ns + len(m.group(0).rstrip())))
                shift = m.end() - ns
            else:
                shift = 0
                if s < e:
                    out.append((s, e))
        return out

    def split(self, text: str) -> list[str]:
        return [text[s:e] for s, e in self.spans(text)]


@functools.lru_cache(maxsize=1)
def _punkt() -> _Punkt:
    import json

    return _Punkt(json.loads(_asset_text("punkt_english.json")))


def split_sentences(text: str) -> list[str]:
    """Punkt sentence split with NLTK's English parameters (as ``nltk.sent_tokenize`` in nltk 3.2.5)."""
    return _punkt().split(text)


# --------------------------------------------------------------------------------------------------
# Penn Treebank word tokenizer, as in nltk 3.2.5 (later nltk versions split quotes differently)
# --------------------------------------------------------------------------------------------------


def _rules(*pairs: tuple[str, str]) -> list[tuple[re.Pattern, str]]:
    # ASCII: Python 2 compiled these without re.UNICODE, and the official code ran there.
    return [(re.compile(p, re.ASCII), r) for p, r in pairs]


_TB_OPENING = _rules(
    (r'^"', "``"),  # a double quote at the very start opens
    (r"(``)", r" \1 "),
    (r'([ (\[{<])"', r"\1 `` "),  # ... and so does one after space or an opening bracket
)
_TB_PUNCT = _rules(
    (r"([:,])([^\d])", r" \1 \2"),  # comma/colon not inside a number
    (r"([:,])$", r" \1 "),
    (r"\.\.\.", r" ... "),
    (r"[;@#$%&]", r" \g<0> "),
    (r"""([^.])(\.)([\]\)}>"']*)\s*$""", r"\1 \2\3 "),  # only the sentence-final period
    (r"[?!]", r" \g<0> "),
    (r"([^'])' ", r"\1 ' "),  # a closing single quote before a space
    (r"[\]\[\(\)\{\}\<\>]", r" \g<0> "),
    (r"--", r" -- "),
)
_TB_CLOSING = _rules(
    (r'"', " '' "),
    (r"(\S)('')", r"\1 \2 "),
    (r"([^' ])('[sS]|'[mM]|'[dD]|') ", r"\1 \2 "),
    (r"([^' ])('ll|'LL|'re|'RE|'ve|'VE|n't|N'T) ", r"\1 \2 "),
)
# Robert MacIntyre's contractions ("cannot" -> "can not", "gonna" -> "gon na", " 'tis" -> " 't is").
_TB_SPLITS = [
    re.compile(p, re.ASCII | re.IGNORECASE)
    for p in (
        r"\b(can)(not)\b",
        r"\b(d)('ye)\b",
        r"\b(gim)(me)\b",
        r"\b(gon)(na)\b",
        r"\b(got)(ta)\b",
        r"\b(lem)(me)\b",
        r"\b(mor)('n)\b",
        r"\b(wan)(na)\s",
        r" ('t)(is)\b",
        r" ('t)(was)\b",
    )
]


def _treebank(sentence: str) -> list[str]:
    text = sentence
    for rx, rep in _TB_OPENING:
        text = rx.sub(rep, text)
    for rx, rep in _TB_PUNCT:
        text = rx.sub(rep, text)
    text = f" {text} "  # padding lets the closing rules look for a following space
    for rx, rep in _TB_CLOSING:
        text = rx.sub(rep, text)
    for rx in _TB_SPLITS:
        text = rx.sub(r" \1 \2 ", text)
    return text.split()


def word_tokenize(text: str) -> list[str]:
    """``nltk.word_tokenize(text)`` as nltk 3.2.5 does it: Punkt sentences, then Treebank words."""
    return [tok for sent in split_sentences(text) for tok in _treebank(sent)]


def _py2_lower(text: str) -> str:
    # Python 2's unicode.lower() mapped character by character: Python 3 turns "İ" into "i" plus a
    # combining dot and a word-final "Σ" into "ς", Python 2 gave "i" and "σ".
    if text.isascii():
        return text.lower()
    return "".join("i" if c == "\u0130" else c.lower() for c in text)


def tokenize_caption(caption: str) -> list[str]:
    """The official first step: ``nltk.word_tokenize(caption.lower())``."""
    return word_tokenize(_py2_lower(caption))


# --------------------------------------------------------------------------------------------------
# Pattern 3.6 singularize (pattern.text.en.inflect), rules kept in their order, slips included
# --------------------------------------------------------------------------------------------------

# A word that is a *suffix* of one of these is returned unchanged. Because the test is "suffix of",
# short words such as "is", "as", "s" or "es" survive too.
_UNINFLECTED = (
    "bison debris headquarters pincers trout bream diabetes herpes pliers tuna breeches djinn high-jinks "
    "proceedings whiting britches eland homework rabies wildebeest carp elk innings salmon chassis flounder "
    "jackanapes scissors christmas gallows mackerel series clippers georgia measles shears cod graffiti mews "
    "species contretemps mumps swine corps news swiss"
).split()
_UNCOUNTABLE = (
    "advice equipment happiness luggage news software bread fruit information mathematics progress "
    "understanding butter furniture ketchup mayonnaise research water cheese garbage knowledge meat rice "
    "electricity gravel love mustard sand"
).split()
# "<x>s" for these is returned (lower-cased) unchanged: "cookies", "collies", "doggies" stay plural.
# "^pie" and "^tie" carry a literal caret in Pattern, so they never match and "ties" -> "ty".
_IE_WORDS = (
    "alergie cutie hoagie newbie softie veggie auntie doggie hottie nightie sortie weenie beanie eyrie "
    "indie oldie stoolie yuppie birdie freebie junkie ^pie sweetie zombie bogie goonie laddie pixie techie "
    "bombie groupie laramie quickie ^tie collie hankie lingerie reverie toughie cookie hippie meanie rookie "
    "valkyrie"
).split()
# Irregular plural endings -> singular endings. No key is a suffix of another, so order is irrelevant.
_IRREGULAR = dict(
    pair.split(":")
    for pair in (
        "atlantes:atlas atlases:atlas axes:axe beeves:beef brethren:brother children:child corpora:corpus "
        "corpuses:corpus ephemerides:ephemeris feet:foot ganglia:ganglion geese:goose genera:genus "
        "genii:genie graffiti:graffito helves:helve kine:cow leaves:leaf loaves:loaf men:man "
        "mongooses:mongoose monies:money moves:move mythoi:mythos numena:numen occipita:occiput "
        "octopodes:octopus opera:opus opuses:opus our:my oxen:ox penes:penis penises:penis people:person "
        "sexes:sex soliloquies:soliloquy teeth:tooth testes:testis trilbys:trilby turves:turf zoa:zoon"
    ).split()
)
_PLURAL_PREPOSITIONS = frozenset(
    (
        "about above across after among around at athwart before behind below beneath beside besides "
        "between betwixt beyond but by during except for from in into near of off on onto out over since "
        "till to under until unto upon with"
    ).split()
)
# Suffix rules, first match wins. "(?i)" marks the case-insensitive ones; the -ves rules without it are
# case-sensitive in Pattern as well. Bracketed alternations such as "[octop|vir]" and "[m|l]" are
# character classes in Pattern too (so "slice" -> "slouse", "safari" -> "safarus"); the first rule
# that matches any word ending in "s" is the last one.
_SUFFIX_RULES = [
    (re.compile(p), r)
    for p, r in (
        (r"(?i)(.)ae$", r"\1a"),
        (r"(?i)(.)itis$", r"\1itis"),
        (r"(?i)(.)eaux$", r"\1eau"),
        (r"(?i)(quiz)zes$", r"\1"),
        (r"(?i)(matr)ices$", r"\1ix"),
        (r"(?i)(ap|vert|ind)ices$", r"\1ex"),
        (r"(?i)^(ox)en", r"\1"),
        (r"(?i)(alias|status)es$", r"\1"),
        (r"(?i)([octop|vir])i$", r"\1us"),
        (r"(?i)(cris|ax|test)es$", r"\1is"),
        (r"(?i)(shoe)s$", r"\1"),
        (r"(?i)(o)es$", r"\1"),
        (r"(?i)(bus)es$", r"\1"),
        (r"(?i)([m|l])ice$", r"\1ouse"),
        (r"(?i)(x|ch|ss|sh)es$", r"\1"),
        (r"(?i)(m)ovies$", r"\1ovie"),
        (r"(?i)(.)ombies$", r"\1ombie"),
        (r"(?i)(s)eries$", r"\1eries"),
        (r"(?i)([^aeiouy]|qu)ies$", r"\1y"),
        (r"([aeo]l)ves$", r"\1f"),
        (r"([^d]ea)ves$", r"\1f"),
        (r"arves$", r"arf"),
        (r"erves$", r"erve"),
        (r"([nlw]i)ves$", r"\1fe"),
        (r"(?i)([lr])ves$", r"\1f"),
        (r"([aeo])ves$", r"\1ve"),
        (r"(?i)(sive)s$", r"\1"),
        (r"(?i)(tive)s$", r"\1"),
        (r"(?i)(hive)s$", r"\1"),
        (r"(?i)([^f])ves$", r"\1fe"),
        (r"(?i)(^analy)ses$", r"\1sis"),
        # Groups that did not take part are dropped from the replacement, as Pattern does by hand.
        (r"(?i)((a)naly|(b)a|(d)iagno|(p)arenthe|(p)rogno|(s)ynop|(t)he)ses$", r"\1\2sis"),
        (r"(?i)(.)opses$", r"\1opsis"),
        (r"(?i)(.)yses$", r"\1ysis"),
        (r"(?i)(h|d|r|o|n|b|cl|p)oses$", r"\1ose"),
        (r"(?i)(fruct|gluc|galact|lact|ket|malt|rib|sacchar|cellul)ose$", r"\1ose"),
        (r"(?i)(.)oses$", r"\1osis"),
        (r"(?i)([ti])a$", r"\1um"),
        (r"(?i)(n)ews$", r"\1ews"),
        (r"(?i)s$", ""),
    )
]


@functools.lru_cache(maxsize=1 << 16)
def singularize(word: str) -> str:
    """Pattern 3.6 ``singularize(word)`` (default noun, no custom table), bugs included."""
    if "-" in word:  # "mothers-in-law" -> "mother-in-law"
        head, _, rest = word.partition("-")
        if rest.split("-")[0] in _PLURAL_PREPOSITIONS:
            return singularize(head) + "-" + rest
    if word.endswith("'"):  # "dogs'" -> "dog's" (and "'" -> "'s", "''" -> "'s's")
        return singularize(word[:-1]) + "'s"
    low = word.lower()
    if any(x.endswith(low) for x in _UNINFLECTED) or any(x.endswith(low) for x in _UNCOUNTABLE):
        return word
    if any(low.endswith(x + "s") for x in _IE_WORDS):
        return low
    for plural, single in _IRREGULAR.items():
        if low.endswith(plural):
            return word[: len(word) - len(plural)] + single
    for rx, rep in _SUFFIX_RULES:
        if rx.search(word):
            return rx.sub(rep, word)
    return word


# --------------------------------------------------------------------------------------------------
# Synonyms, double words and the caption -> objects mapping
# --------------------------------------------------------------------------------------------------

# COCO double words that map to themselves (the official list, which names "hot dog" and "teddy bear"
# twice; "stove top oven" has three words and so can never match a pair).
_DOUBLE_WORDS = (
    "motor bike", "motor cycle", "air plane", "traffic light", "street light", "traffic signal",
    "stop light", "fire hydrant", "stop sign", "parking meter", "suit case", "sports ball",
    "baseball bat", "baseball glove", "tennis racket", "wine glass", "hot dog", "cell phone",
    "mobile phone", "teddy bear", "hair drier", "potted plant", "bow tie", "laptop computer",
    "stove top oven", "home plate", "train track",
)  # fmt: skip
# "baby elephant" is an elephant, not a person (baby/adult are synonyms of person).
_ANIMAL_WORDS = ("bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe",
                 "animal", "cub")  # fmt: skip
# "passenger train" is a train, not a person.
_VEHICLE_WORDS = ("jet", "train")
_OVERRIDES = {"bow tie": "tie", "toilet seat": "toilet", "wine glas": "wine glass"}


class CaptionWords(NamedTuple):
    """What the official ``caption_to_words`` returns, in its order."""

    surface: list[str]  # object words as found (singularized / merged), repeats kept
    nodes: list[str]  # the COCO category name (node word) of each surface word
    idxs: list[int]  # original-token index of each (shifted after a dropped "seat", as official)
    merged: list[str]  # every token after singularize + pair merge, before the "seat" filter


class ObjectMatcher:
    """CHAIR's synonym table and rules; build once (see :func:`get_matcher`) and reuse."""

    def __init__(self, synonyms_text: str):
        import hashlib

        self.digest = "sha256:" + hashlib.sha256(synonyms_text.encode("utf-8")).hexdigest()
        # Official parsing: each line stripped, then split on ", " exactly. Two entries keep a leading
        # space (" motor bike", " cheesecake") and so never match; "iPhone" never matches lower text.
        self.rows: list[list[str]] = [line.strip().split(", ") for line in synonyms_text.splitlines()]
        self.rows = [row for row in self.rows if row != [""]]
        self.categories: list[str] = [row[0] for row in self.rows]
        self.objects: frozenset[str] = frozenset(w for row in self.rows for w in row)
        self.inverse: dict[str, str] = {w: row[0] for row in self.rows for w in row}
        double = {w: w for w in _DOUBLE_WORDS}
        for animal in _ANIMAL_WORDS:
            double[f"baby {animal}"] = animal
            double[f"adult {animal}"] = animal
        for vehicle in _VEHICLE_WORDS:
            double[f"passenger {vehicle}"] = vehicle
        double.update(_OVERRIDES)
        self.double_words: dict[str, str] = double

    @classmethod
    def from_package(cls) -> ObjectMatcher:
        return cls(_asset_text("synonyms.txt"))

    def node_of(self, word: str) -> str | None:
        """The node word (COCO category) of a synonym-table entry, else None."""
        return self.inverse.get(word)

    def merge(self, tokens: list[str]) -> tuple[list[str], list[int]]:
        """Official pair merge: (merged words, index of each one's first token)."""
        merged: list[str] = []
        starts: list[int] = []
        i = 0
        n = len(tokens)
        while i < n:
            starts.append(i)
            pair = " ".join(tokens[i : i + 2])
            hit = self.double_words.get(pair)
            if hit is not None:
                merged.append(hit)
                i += 2
            else:
                merged.append(tokens[i])
                i += 1
        return merged, starts

    def words_to_objects(self, tokens: list[str]) -> CaptionWords:
        """Steps 3-5 on already singularized tokens."""
        merged, starts = self.merge(tokens)
        words = merged
        if "toilet" in merged and "seat" in merged:
            words = [w for w in merged if w != "seat"]
        # Positions come from the filtered list but index the unfiltered starts: the official shift.
        idxs = [starts[k] for k, w in enumerate(words) if w in self.objects]
        surface = [w for w in words if w in self.objects]
        return CaptionWords(surface, [self.inverse[w] for w in surface], idxs, merged)

    def caption_to_words(self, caption: str) -> CaptionWords:
        """The official ``caption_to_words``: lowercase, tokenize, singularize, merge, filter, map."""
        return self.words_to_objects([singularize(t) for t in tokenize_caption(caption)])

    def node_words(self, text: str) -> list[str]:
        """Node words mentioned in ``text``, in order, repeats kept."""
        return self.caption_to_words(text).nodes


@functools.lru_cache(maxsize=1)
def get_matcher() -> ObjectMatcher:
    """The shared matcher over the shipped synonym table (loaded once per process)."""
    return ObjectMatcher.from_package()


def node_words(text: str) -> list[str]:
    """Node words (COCO category names) mentioned in ``text``, as the official CHAIR finds them."""
    return get_matcher().node_words(text)
