"""CLIPTokenizer must give open_clip's ids exactly: pretrained CLIP text towers depend on them."""

import html
import pickle
import random
import string

import ftfy
import pytest
import torch

from lvmtrain.data import tokenizer as tokenizer_module
from lvmtrain.data.tokenizer import CLIPTokenizer, clean_text

try:
    import open_clip
except ImportError:
    open_clip = None

needs_open_clip = pytest.mark.skipif(
    open_clip is None, reason="open_clip is not installed (pip install -e '.[test]'); parity needs it"
)

CONTEXT_LENGTHS = [77, 16]
NUM_CAPTIONS = 1000

_WORDS = (
    "a photo of the dog cat man woman child car street beach sunset mountain river city night "
    "red blue green small large old new running sitting on in with at by near under two three "
    "close-up portrait illustration vintage aerial view wooden table bowl fruit bike rider"
).split()
_ACCENTED = ["café", "naïve", "Zürich", "São Paulo", "crème brûlée", "Ångström", "façade", "Øresund"]
_DECOMPOSED = ["cafe\u0301", "n\u0303o", "A\u030angstro\u0308m"]
_SCRIPTS = [
    "日本語のテキスト",
    "一只猫坐在桌子上",
    "한국어 문장입니다",
    "مرحبا بالعالم",
    "صورة لقطة على الطاولة",
    "Привет, мир",
    "नमस्ते दुनिया",
    "สวัสดีชาวโลก",
    "שלום עולם",
    "Ελληνικά γράμματα",
]
_EMOJI = [
    "🐶", "😀", "🔥🔥🔥", "👍🏽", "👋🏿", "👨‍👩‍👧‍👦", "👩🏻‍💻", "🏳️‍🌈", "🇯🇵", "🇺🇸🇫🇷", "1️⃣", "❤️", "🧑🏾‍🤝‍🧑🏻",
]
_HTML = [
    "&amp;", "&amp;amp;", "&lt;b&gt;", "&quot;", "&#39;", "&nbsp;", "&#x1F600;", "&eacute;", "&AMP;",
    "&amp", "&copy; 2024", "<br/>", "Tom &amp; Jerry",
]
_NUMBERS = ["2024", "3.14159", "1,000,000", "50%", "#1", "٣٤٥", "²", "Ⅻ", "½", "007", "-12.5°C"]
_PUNCT = [
    "!!!", "?!", "...", "—", "–", "«quoted»", "“curly”", "‘single’", "(x)", "[tag]", "@user", "#tag",
]
_ODD = [
    "don't", "IT'S", "we'll", "they're", "I'M", "'ſ", "ﬁsh ﬂower", "ＦＵＬＬ ｗｉｄｔｈ", "\x1b[31mred\x1b[0m",
    "zero\u200bwidth", "soft\u00adhyphen", "nul\x00byte", "<start_of_text>", "<END_OF_TEXT>",
    "aaaaaaaaaaaaa", "ababababab", "http://example.com/img_001.jpg?w=640&h=480", "snake_case-and/slash",
]
_WHITESPACE = [" ", "  ", "\t", "\n", "\r\n", "\u00a0", "\u3000", " \t\n ", "\u2028"]


def _mojibake(rng: random.Random) -> str:
    word = rng.choice(_ACCENTED + ["it’s", "“hello”", "naïve café"])
    return word.encode("utf-8").decode(rng.choice(["latin-1", "cp1252"]), errors="replace")


def _random_codepoints(rng: random.Random) -> str:
    ranges = [(0x20, 0x7E), (0xA0, 0x24F), (0x370, 0x3FF), (0x400, 0x4FF), (0x600, 0x6FF),
              (0x3040, 0x30FF), (0x4E00, 0x9FFF), (0xAC00, 0xD7A3), (0x1F300, 0x1FAFF)]
    return "".join(chr(rng.randint(*rng.choice(ranges))) for _ in range(rng.randint(1, 40)))


def _make_captions(seed: int = 0, count: int = NUM_CAPTIONS) -> list[str]:
    rng = random.Random(seed)
    pieces = {
        "word": lambda: rng.choice(_WORDS),
        "Word": lambda: rng.choice(_WORDS).capitalize(),
        "WORD": lambda: rng.choice(_WORDS).upper(),
        "mIxEd": lambda: "".join(c.upper() if rng.random() < 0.5 else c for c in rng.choice(_WORDS)),
        "accent": lambda: rng.choice(_ACCENTED + _DECOMPOSED),
        "script": lambda: rng.choice(_SCRIPTS),
        "emoji": lambda: rng.choice(_EMOJI),
        "html": lambda: rng.choice(_HTML),
        "number": lambda: rng.choice(_NUMBERS),
        "punct": lambda: rng.choice(_PUNCT),
        "odd": lambda: rng.choice(_ODD),
        "mojibake": lambda: _mojibake(rng),
        "codepoints": lambda: _random_codepoints(rng),
        "ascii": lambda: "".join(rng.choice(string.printable) for _ in range(rng.randint(1, 12))),
    }
    kinds = list(pieces)
    captions = ["", " ", "\t\n", "a", "A photo of a cat.", "&amp;amp;amp;"]
    while len(captions) < count:
        # Mostly plain English, as in real caption streams, with every other kind mixed in.
        n = rng.choice([3, 8, 15, 30]) if rng.random() < 0.9 else rng.randint(80, 400)
        parts = []
        for _ in range(n):
            kind = "word" if rng.random() < 0.5 else rng.choice(kinds)
            parts.append(pieces[kind]())
            parts.append(rng.choice(_WHITESPACE) if rng.random() < 0.15 else rng.choice([" ", " ", ""]))
        captions.append("".join(parts))
    return captions


def _boundary_captions(context_length: int) -> list[str]:
    # "dog" is one BPE id, so n words give n ids: n = context_length - 2 fills the context exactly.
    return [" ".join(["dog"] * n) for n in range(context_length - 4, context_length + 2)]


@pytest.fixture(scope="module")
def tokenizer() -> CLIPTokenizer:
    return CLIPTokenizer()


@pytest.fixture(scope="module")
def captions() -> list[str]:
    return _make_captions()


@pytest.fixture(scope="module")
def reference():
    return open_clip.tokenizer.SimpleTokenizer() if open_clip is not None else None


def _first_difference(ours: torch.Tensor, theirs: torch.Tensor, texts: list[str]) -> str:
    row = int((ours != theirs).any(dim=1).nonzero()[0])
    return (
        f"caption {row} {texts[row]!r}:\n"
        f" ours   {ours[row].tolist()}\n theirs {theirs[row].tolist()}"
    )


@needs_open_clip
@pytest.mark.parametrize("context_length", CONTEXT_LENGTHS)
def test_ids_match_open_clip(tokenizer, captions, context_length):
    texts = captions + _boundary_captions(context_length)
    ours = tokenizer(texts, context_length=context_length)
    theirs = open_clip.tokenize(texts, context_length=context_length)
    assert ours.shape == theirs.shape == (len(texts), context_length)
    assert torch.equal(ours, theirs), _first_difference(ours, theirs, texts)


@needs_open_clip
def test_get_tokenizer_and_default_context_match_open_clip(captions):
    ours = CLIPTokenizer(context_length=16)(captions[:200])
    theirs = open_clip.get_tokenizer("ViT-B-32", context_length=16)(captions[:200])
    assert torch.equal(ours, theirs), _first_difference(ours, theirs, captions[:200])
    assert torch.equal(CLIPTokenizer()(captions[:50]), open_clip.tokenize(captions[:50]))


@needs_open_clip
def test_encode_matches_open_clip_without_truncation(tokenizer, captions, reference):
    long_texts = [c for c in captions if len(c) > 300]
    long_texts.append("".join(chr(0x4E00 + (i * 7919) % 20000) for i in range(2000)))
    assert len(long_texts) > 10
    for text in long_texts:
        assert tokenizer.encode(text) == reference.encode(text), repr(text[:80])


def test_known_ids(tokenizer):
    # Pinned from open_clip 3.3.0, so a change is caught even where open_clip is absent.
    assert tokenizer.encode("a photo of a cat.") == [320, 1125, 539, 320, 2368, 269]
    assert tokenizer.encode("Tom &amp; Jerry's café 🐶") == [2435, 261, 9164, 568, 15304, 10631]
    assert tokenizer.encode("日本語") == [39121, 44353, 34002, 508]
    assert tokenizer.encode("<start_of_text> x <end_of_text>") == [49406, 343, 49407]
    assert tokenizer.vocab_size == 49408
    assert (tokenizer.sot_token_id, tokenizer.eot_token_id) == (49406, 49407)


@pytest.mark.parametrize("context_length", CONTEXT_LENGTHS)
def test_shape_dtype_padding_and_truncation(tokenizer, context_length):
    batch = tokenizer(["", "a photo of a cat.", "dog " * 500], context_length=context_length)
    assert batch.dtype == torch.long and batch.shape == (3, context_length)
    assert batch[0, :2].tolist() == [49406, 49407] and not batch[0, 2:].any()
    assert batch[1, :8].tolist() == [49406, 320, 1125, 539, 320, 2368, 269, 49407]
    assert not batch[1, 8:].any()
    assert batch[2, 0] == 49406 and batch[2, -1] == 49407 and (batch[2, 1:-1] == 1929).all()

    boundary = tokenizer(_boundary_captions(context_length), context_length)
    for n, row in zip(range(context_length - 4, context_length + 2), boundary):
        length = min(n + 2, context_length)
        assert row[length - 1] == 49407 and not row[length:].any()
        assert (row[1 : length - 1] == 1929).all()

    assert tokenizer("one caption").shape == (1, 77)
    assert tokenizer([]).shape == (0, 77)


def test_plain_ascii_shortcut_equals_full_cleaning():
    rng = random.Random(3)
    alphabet = string.printable + "&<>;#"
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60))) for _ in range(3000)]
    texts += ["&amp; x", "a\rb", "a\x0bb", "a\x0cb", "\x1b[1mbold", "Ã©"]
    for text in texts:
        full = " ".join(html.unescape(html.unescape(ftfy.fix_text(text))).split()).lower()
        assert clean_text(text) == full, repr(text)


def test_word_cache_is_bounded_and_keeps_ids(monkeypatch, captions):
    expected = CLIPTokenizer()(captions[:300])
    monkeypatch.setattr(tokenizer_module, "_MAX_CACHED_WORDS", 50)
    small = CLIPTokenizer()
    assert torch.equal(small(captions[:300]), expected)
    assert len(small._cache) <= 50
    assert small.encode("<start_of_text>") == [small.sot_token_id]


def test_pickles_for_dataloader_workers(tokenizer, captions):
    expected = tokenizer(captions[:300], context_length=16)
    clone = pickle.loads(pickle.dumps(tokenizer))
    assert clone.context_length == tokenizer.context_length
    assert torch.equal(clone(captions[:300], context_length=16), expected)
    assert torch.equal(clone(captions[300:400]), tokenizer(captions[300:400]))


def test_rejects_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="context_length"):
        CLIPTokenizer(context_length=1)
    bad = tmp_path / "vocab.txt.gz"
    bad.write_bytes(b"not gzip")
    with pytest.raises(RuntimeError, match="vocab.txt.gz"):
        CLIPTokenizer(vocab_path=str(bad))
