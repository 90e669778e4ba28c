"""A vocab from training TSVs: every caption (column 1) and object-tag string (column 4, where a
line has one) through tokenizer.build_vocab, so a text tower trained from scratch knows every
character and word of its data (tools/build_vocab.py; the trainer's `vocab_file: auto`).

With a size limit (the text tower's vocab_size) words seen fewer than min_freq times are left
out, min_freq doubling from 1 until the vocab fits; every character stays, so no caption gets an
[UNK] where it had a letter before."""
from .data.tsv import iter_records
from .tokenizer import VocabError, build_vocab


def tsv_texts(paths):
    """Captions and tag strings of every line of the TSVs, in file order."""
    texts = []
    for path in paths:
        for record in iter_records(path):
            texts.append(record.text)
            if record.tags:
                texts.append(record.tags)
    return texts


def fitted_vocab(texts, max_size=None):
    """(tokens, min_freq): build_vocab(texts, min_freq) with the smallest power-of-two min_freq
    whose vocab has at most max_size tokens (None = no limit)."""
    min_freq = 1
    while True:
        tokens = build_vocab(texts, min_freq)
        if max_size is None or len(tokens) <= max_size:
            return tokens, min_freq
        smaller = build_vocab(texts, min_freq * 2)
        if len(smaller) == len(tokens):  # only single characters left: it cannot shrink further
            raise VocabError(f"the training texts have {len(tokens)} distinct characters and "
                             f"words, more than the {max_size} a vocab may hold here")
        min_freq *= 2


def tsv_vocab(paths, max_size=None):
    """(tokens, min_freq) of the captions and tags of the TSVs."""
    return fitted_vocab(tsv_texts(paths), max_size)
