"""CLIP's byte-level BPE tokenizer, giving the same ids as OpenAI CLIP and open_clip.

Every CLIP checkpoint we load or publish was trained on these ids, so the rules below (text
cleaning, the word pattern, the byte-to-unicode table, the merge order, truncation) are fixed by
those checkpoints; tests/unit/test_tokenizer.py checks them against open_clip id for id.
"""

from __future__ import annotations

import gzip
import heapq
import html
import importlib.resources
import pathlib

import ftfy
import regex
import torch

SOT_TOKEN = "<start_of_text>"
EOT_TOKEN = "<end_of_text>"
DEFAULT_CONTEXT_LENGTH = 77
_VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
# NOTE: the file holds more merges than CLIP was trained with; CLIP's 49408 ids are 256 byte
# symbols, the same 256 as word endings, 48894 merges and the two special tokens.
_NUM_MERGES = 49152 - 256 - 2
_END_OF_WORD = "</w>"

# The special tokens come first so that a caption quoting them literally still maps to their ids,
# as it does in CLIP. IGNORECASE is part of the contract: after lower-casing, it still lets e.g.
# "'ſ" (long s) match "'s".
_WORD_PATTERN = (
    regex.escape(SOT_TOKEN)
    + "|"
    + regex.escape(EOT_TOKEN)
    + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)
# Printable ASCII without '&' (plus tab and newline) is left unchanged by ftfy.fix_text and by
# html.unescape, so such captions skip both; ftfy is about a third of the cost of a short caption.
_UNCHANGED_BY_FIXING = regex.compile(r"[\t\n\x20-\x25\x27-\x7e]*")
# Bounds the per-word cache in long-running DataLoader workers; captions with URLs, typos and
# unspaced CJK make the set of distinct words grow without end.
_MAX_CACHED_WORDS = 1 << 18


def bytes_to_unicode() -> dict[int, str]:
    """Maps each byte to a printable character, so BPE runs on strings without control or space
    characters and any UTF-8 text is representable without an unknown token."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


def clean_text(text: str) -> str:
    """CLIP's caption cleaning: fix mojibake, unescape HTML (twice, as CLIP does, which also undoes
    double escaping like "&amp;amp;"), collapse whitespace, lower-case."""
    if not _UNCHANGED_BY_FIXING.fullmatch(text):
        text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return " ".join(text.split()).lower()


class CLIPTokenizer:
    """Text -> CLIP token ids: `[sot, *bpe_ids, eot, 0, ...]` of `context_length` per caption.

    A caption longer than the context is cut and its last kept id replaced by `eot_token_id`,
    because CLIP's text tower pools the features at the eot position.
    """

    def __init__(self, context_length: int = DEFAULT_CONTEXT_LENGTH, vocab_path: str | None = None):
        if context_length < 2:
            raise ValueError(
                f"context_length={context_length} leaves no room for the start and end tokens; "
                "use at least 2 (CLIP uses 77)"
            )
        self.context_length = context_length
        self.vocab_path = vocab_path
        merges = _read_merges(vocab_path)

        byte_symbols = list(bytes_to_unicode().values())
        vocab = byte_symbols + [s + _END_OF_WORD for s in byte_symbols]
        vocab += ["".join(pair) for pair in merges]
        vocab += [SOT_TOKEN, EOT_TOKEN]
        # dict(zip(...)) rather than a check for duplicates: a later entry wins, as in CLIP.
        self._encoder = dict(zip(vocab, range(len(vocab))))
        self._decoder = {i: s for s, i in self._encoder.items()}
        self._bpe_ranks = dict(zip(merges, range(len(merges))))
        self._byte_encoder = bytes_to_unicode()
        self._byte_decoder = {c: b for b, c in self._byte_encoder.items()}

        self.vocab_size = len(self._encoder)
        self.sot_token_id = self._encoder[SOT_TOKEN]
        self.eot_token_id = self._encoder[EOT_TOKEN]
        self._pattern = regex.compile(_WORD_PATTERN, regex.IGNORECASE)
        self._cache: dict[str, tuple[int, ...]] = {}
        self._reset_cache()

    def encode(self, text: str) -> list[int]:
        """BPE ids of `text`, without the start/end tokens and without padding."""
        ids: list[int] = []
        cache = self._cache
        for word in self._pattern.findall(clean_text(text)):
            word_ids = cache.get(word)
            if word_ids is None:
                word_ids = self._encode_word(word)
            ids.extend(word_ids)
        return ids

    def decode(self, ids) -> str:
        """Text of `ids` (list or tensor); word ends become spaces and special tokens stay as text.
        Padding zeros decode to "!", so strip them first."""
        symbols = "".join(self._decoder[int(i)] for i in ids)
        raw = bytearray(self._byte_decoder[c] for c in symbols)
        return raw.decode("utf-8", errors="replace").replace(_END_OF_WORD, " ")

    def __call__(
        self, texts: str | list[str], context_length: int | None = None
    ) -> torch.LongTensor:
        """Token ids of shape [len(texts), context_length] (a single string gives one row)."""
        if isinstance(texts, str):
            texts = [texts]
        context_length = context_length or self.context_length
        if context_length < 2:
            raise ValueError(f"context_length={context_length} must be at least 2")
        rows = []
        for text in texts:
            row = [self.sot_token_id, *self.encode(text)[: context_length - 2], self.eot_token_id]
            row.extend([0] * (context_length - len(row)))
            rows.append(row)
        if not rows:
            return torch.zeros(0, context_length, dtype=torch.long)
        return torch.tensor(rows, dtype=torch.long)

    def __getstate__(self) -> dict:
        # NOTE: the word cache is dropped so that every DataLoader worker receives a small pickle.
        state = self.__dict__.copy()
        state["_cache"] = {}
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reset_cache()

    def _reset_cache(self) -> None:
        self._cache.clear()
        # Words that are already special tokens bypass BPE; only their exact lower-case spelling
        # does, which is what CLIP's cache does.
        self._cache[SOT_TOKEN] = (self.sot_token_id,)
        self._cache[EOT_TOKEN] = (self.eot_token_id,)

    def _encode_word(self, word: str) -> tuple[int, ...]:
        # Latin-1 decodes each byte to the code point of the same value, so one str.translate
        # maps the UTF-8 bytes to BPE symbols at C speed.
        symbols = word.encode("utf-8").decode("latin-1").translate(self._byte_encoder)
        encoder = self._encoder
        word_ids = tuple(encoder[s] for s in self._merge(symbols))
        if len(self._cache) >= _MAX_CACHED_WORDS:
            self._reset_cache()
        self._cache[word] = word_ids
        return word_ids

    def _merge(self, symbols: str) -> list[str]:
        """Applies the merges to one word, lowest rank first, as CLIP does.

        CLIP rescans the whole word after every merge (quadratic in the word length, which matters
        for unspaced CJK or long punctuation runs). Here the adjacent pairs sit in a heap keyed by
        (rank, position) over a linked list of symbols. All occurrences of the lowest-ranked pair
        are merged left to right in one pass, before the pairs that this creates are considered,
        which is exactly CLIP's order, including overlapping runs such as "aaa" -> "aa a".
        """
        parts: list[str | None] = list(symbols[:-1]) + [symbols[-1] + _END_OF_WORD]
        n = len(parts)
        if n == 1:
            return parts
        ranks = self._bpe_ranks
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        prv = list(range(-1, n - 1))
        heap = [
            (rank, i)
            for i, rank in enumerate(map(ranks.get, zip(parts, parts[1:])))
            if rank is not None
        ]
        heapq.heapify(heap)
        while heap:
            rank = heap[0][0]
            merged = []
            while heap and heap[0][0] == rank:
                _, i = heapq.heappop(heap)
                left = parts[i]
                j = nxt[i]
                # Entries go stale when a neighbour merges; one is live only if its pair is still
                # there (ranks are unique per pair, so the rank identifies the pair).
                if left is None or j == -1 or ranks.get((left, parts[j])) != rank:
                    continue
                parts[i] = left + parts[j]
                parts[j] = None
                nxt[i] = nxt[j]
                if nxt[j] != -1:
                    prv[nxt[j]] = i
                merged.append(i)
            new_pairs = set()
            for i in merged:
                if prv[i] != -1:
                    new_pairs.add(prv[i])
                if nxt[i] != -1:
                    new_pairs.add(i)
            for i in new_pairs:
                new_rank = ranks.get((parts[i], parts[nxt[i]]))
                if new_rank is not None:
                    heapq.heappush(heap, (new_rank, i))
        return [p for p in parts if p is not None]


def _read_merges(vocab_path: str | None) -> list[tuple[str, ...]]:
    if vocab_path is None:
        source = importlib.resources.files("lvmtrain").joinpath("assets", _VOCAB_FILE)
        where = f"lvmtrain/assets/{_VOCAB_FILE} (package data)"
    else:
        source = pathlib.Path(vocab_path)
        where = vocab_path
    try:
        lines = gzip.decompress(source.read_bytes()).decode("utf-8").split("\n")
    except (OSError, EOFError) as e:
        raise RuntimeError(
            f"cannot read the BPE vocabulary from {where}: {e}; expected CLIP's gzipped merge list "
            f"({_VOCAB_FILE}); reinstall lvmtrain or pass vocab_path= to such a file"
        ) from e
    # Line 0 is a version header.
    merges = [tuple(line.split()) for line in lines[1 : _NUM_MERGES + 1]]
    if len(merges) != _NUM_MERGES:
        raise RuntimeError(
            f"{where} holds {len(merges)} merges but CLIP's vocabulary needs {_NUM_MERGES}; "
            f"pass vocab_path= to CLIP's {_VOCAB_FILE}"
        )
    return merges
