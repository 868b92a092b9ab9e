"""A CLIP BPE tokenizer built offline.

The base vocabulary is CLIP's byte-level alphabet (every byte as a unicode symbol, with and
without the end-of-word marker), so ANY prompt tokenizes, including words the merges never saw.
Merges are learned from the public prompts only, so no private word shapes the vocabulary."""

from __future__ import annotations

import collections
import re

from transformers import CLIPTokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
END_OF_WORD = "</w>"


def bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible byte -> printable-unicode map."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes)))


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+|[0-9]|[^\sa-z0-9]+", text.lower())


def learn_merges(corpus: list[str], num_merges: int) -> list[tuple[str, str]]:
    """Plain BPE: repeatedly merge the most frequent adjacent symbol pair."""
    byte_map = bytes_to_unicode()
    counts = collections.Counter(w for line in corpus for w in _words(line))
    words = {}
    for word, n in counts.items():
        symbols = [byte_map[b] for b in word.encode("utf-8")]
        symbols[-1] += END_OF_WORD
        words[tuple(symbols)] = n
    merges = []
    for _ in range(num_merges):
        pairs = collections.Counter()
        for symbols, n in words.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += n
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))
        merges.append(best)
        merged = {}
        for symbols, n in words.items():
            out, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            merged[tuple(out)] = n
        words = merged
    return merges


def build_tokenizer(corpus: list[str], num_merges: int = 200, model_max_length: int = 32) -> CLIPTokenizer:
    """A CLIPTokenizer whose vocab = byte alphabet (+ end-of-word forms) + learned merges."""
    alphabet = list(bytes_to_unicode().values())
    vocab_list = alphabet + [a + END_OF_WORD for a in alphabet]
    merges = learn_merges(corpus, num_merges)
    vocab_list += ["".join(m) for m in merges]
    vocab_list += [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)
