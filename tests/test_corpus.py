"""Local text corpora at scale (data/corpus.py): a plain .txt / .jsonl corpus is indexed in
one streaming pass, not held in memory, yields exactly the documents and batches the
whole-file readers gave, resumes exactly, and a vocabulary reads only a bounded, seeded
sample of it."""

import json
import pickle
import re
import tracemalloc

import numpy as np
import pytest

from configs import bert_mlm
from core.errors import DataError
from data import corpus, pipeline, text, tokenizer


def write(path, content) -> str:
    with open(path, 'wb') as f:
        f.write(content if isinstance(content, bytes) else content.encode('utf-8'))
    return str(path)


def whole_file_txt(path: str) -> list[str]:
    """The documents of a .txt file as the whole-file reader splits them."""
    with open(path, 'rb') as f:
        content = f.read().decode('utf-8-sig')  # no newline translation, as data.text reads
    return [b.strip() for b in re.split(r'\n\s*\n', content) if b.strip()]


TRICKY_TXT = (
    '\ufeff\n\n  First document, first line.\r\nits second line  \r\n\r\n'
    'Zweites Dokument: äöü ß — “quotes”.\n \t \n'
    'third\n\u00a0\u3000\n'  # a line of non-ASCII whitespace only separates documents
    'fourth\x1c\n\n\n\n'
    '\u2028 fifth starts with U+2028\n'
    'sixth? no, the same document: no blank line before\n\n'
    'last, without a final newline'
)


def test_txt_documents_are_those_of_the_whole_file_reader(tmp_path):
    path = write(tmp_path / 'c.txt', TRICKY_TXT)
    docs = text.read_text_files(path)
    assert list(docs) == whole_file_txt(path)
    assert len(docs) == 6 and docs[-1] == 'last, without a final newline'
    assert docs[:2] == list(docs)[:2]


def test_jsonl_documents_are_those_of_the_whole_file_reader(tmp_path):
    records = [{'text': f'doc {i} “ü”', 'other': i} for i in range(7)]
    lines = [json.dumps(r, ensure_ascii=i % 2 == 0) for i, r in enumerate(records)]
    path = write(tmp_path / 'c.jsonl', '\r\n'.join(lines[:3]) + '\n\n  \n' + '\n'.join(lines[3:]))
    assert list(text.read_text_files(path)) == [r['text'] for r in records]


def test_a_large_txt_corpus_is_indexed_not_held_in_memory(tmp_path):
    rng = np.random.default_rng(0)
    words = [f'word{i}' for i in range(5000)]
    paragraph = '\n'.join(' '.join(rng.choice(words, 12)) for _ in range(4))
    path = write(tmp_path / 'big.txt', '\n\n'.join([paragraph] * 60_000))  # ~25 MB
    size = len(paragraph.encode()) * 60_000
    tracemalloc.start()
    try:
        docs = text.read_text_files(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(docs) == 60_000 and docs[12_345] == paragraph
    # 16 bytes a document (its byte range) and the reader's buffers, not the text.
    assert peak < size / 10, (peak, size)


def test_files_of_a_glob_are_one_sequence_in_file_name_order(tmp_path):
    write(tmp_path / 'b.txt', 'b1\n\nb2')
    write(tmp_path / 'a.jsonl', '{"text": "a1"}\n{"text": "a2"}\n')
    write(tmp_path / 'c.tsv', 'text\nc1\n')  # read whole, as before
    write(tmp_path / 'empty.txt', '\n\n')
    docs = text.read_text_files(f'{tmp_path}/*')
    assert [docs[i] for i in range(len(docs))] == ['a1', 'a2', 'b1', 'b2', 'c1']
    assert docs[-1] == 'c1'
    with pytest.raises(IndexError):
        docs[5]


def test_an_indexed_corpus_pickles_by_path_and_offsets(tmp_path):
    path = write(tmp_path / 'c.txt', TRICKY_TXT)
    docs = text.read_text_files(path)
    again = pickle.loads(pickle.dumps(docs))
    assert list(again) == list(docs)
    assert len(pickle.dumps(docs)) < 2000


def test_a_corpus_written_to_during_a_run_is_a_clear_error(tmp_path):
    path = write(tmp_path / 'c.txt', 'one\n\ntwo\n')
    docs = text.read_text_files(path)
    with open(path, 'a') as f:
        f.write('\nthree\n')
    with pytest.raises(DataError, match='changed while the run read it'):
        docs[0]


def test_a_bad_line_is_reported_when_indexing_with_its_line_number(tmp_path):
    path = write(tmp_path / 'c.txt', b'fine\n\nalso fine\nnot \xff utf-8\n')
    with pytest.raises(DataError, match=r'c\.txt line 4 is not UTF-8 text \(byte 0xff at offset'):
        text.read_text_files(path)
    path = write(tmp_path / 'c.jsonl', '{"text": "a"}\n{"text": 3}\n')
    with pytest.raises(DataError, match=r"line 2: field 'text' is a number"):
        text.read_text_files(path)


def mlm_batches(docs, vocab_file: str, state=None, n: int = 6):
    wordpiece = tokenizer.WordPiece(vocab_file)
    data_config = bert_mlm.get_config('tiny').data
    data_config.seq_len, data_config.max_predictions = 32, 5
    spec = pipeline.masking_spec(wordpiece, data_config)
    it = iter(pipeline.mlm_dataset(docs, wordpiece, spec, batch_size=4, seed=3, prefetch=0))
    if state is not None:
        it.set_state(state)
    batches = [next(it) for _ in range(n)]
    return batches, it.get_state()


def test_batches_and_resume_are_exactly_those_of_the_documents_in_memory(tmp_path, pydoc_vocab):
    paragraphs = text.embedded_corpus('pydoc')[:300]
    path = write(tmp_path / 'c.txt', '\n\n'.join(paragraphs))
    indexed = text.read_text_files(path)
    in_memory = whole_file_txt(path)
    straight, _ = mlm_batches(in_memory, pydoc_vocab, n=12)
    first, state = mlm_batches(indexed, pydoc_vocab, n=6)
    resumed, _ = mlm_batches(indexed, pydoc_vocab, state=json.loads(json.dumps(state)), n=6)
    assert len(straight) == len(first + resumed) == 12
    for a, b in zip(straight, first + resumed, strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


class CountingDocs:
    """A corpus that records which documents were read."""

    def __init__(self, docs):
        self.docs, self.read = docs, set()

    def __len__(self):
        return len(self.docs)

    def __getitem__(self, i):
        self.read.add(i)
        return self.docs[i]


def vocab_config(sample_bytes: int, seed: int = 0):
    config = bert_mlm.get_config('tiny')
    config.model.vocab_size = 512
    config.data.vocab_sample_bytes = sample_bytes
    config.seed = seed
    return config


def test_a_trained_vocabulary_reads_only_a_bounded_seeded_sample(tmp_path):
    paragraphs = text.embedded_corpus('pydoc')
    total = sum(len(p.encode()) for p in paragraphs)
    bound = total // 10
    vocabs = []
    for run, seed in enumerate((0, 1)):  # another seed: the same sample, the same vocabulary
        docs = CountingDocs(paragraphs)
        tokenizer.make_tokenizer(vocab_config(bound, seed), str(tmp_path / f'{run}'), docs)
        read = sum(len(paragraphs[i].encode()) for i in docs.read)
        assert bound <= read < bound + max(len(p.encode()) for p in paragraphs)
        vocabs.append((tmp_path / f'{run}' / 'vocab.txt').read_bytes())
    assert vocabs[0] == vocabs[1]
    # Spread over the corpus, not its first documents.
    assert max(docs.read) > 0.9 * len(paragraphs) and min(docs.read) < 0.1 * len(paragraphs)


def test_a_corpus_under_the_bound_trains_on_all_of_it_in_order(tmp_path):
    paragraphs = text.embedded_corpus('pydoc')[:400]
    assert corpus.vocab_sample(paragraphs, 10**9) == paragraphs
    assert corpus.vocab_sample(paragraphs, 0) == paragraphs  # 0: no bound
    tokenizer.make_tokenizer(vocab_config(10**9), str(tmp_path / 'sampled'), paragraphs)
    tokenizer.train_wordpiece(paragraphs, 512, str(tmp_path / 'all.txt'))
    assert (tmp_path / 'sampled' / 'vocab.txt').read_bytes() == (tmp_path / 'all.txt').read_bytes()
