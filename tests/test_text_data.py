"""Text corpora (data/text.py): local files, the embedded corpus, the train/eval split."""

import json

import ml_collections
import pytest

from core.errors import DataError
from data.text import embedded_corpus, load_corpus, read_text_files


def write(path, text: str) -> str:
    path.write_text(text, encoding='utf-8')
    return str(path)


def data_config(**overrides) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict(
        {
            'name': 'pydoc',
            'files': '',
            'eval_files': '',
            'eval_fraction': 0.2,
            'train_split': 'train',
            'eval_split': '',
            'data_dir': '',
            'text_field': 'text',
        }
    )
    c.update(overrides)
    return c


def test_txt_documents_are_separated_by_blank_lines(tmp_path):
    path = write(
        tmp_path / 'a.txt',
        'The first document.\nIts second line.\n\nThe second document.\n\n\n'
        'The third document.\n  \nThe fourth document.\n',
    )
    docs = list(read_text_files(path))
    assert docs == [
        'The first document.\nIts second line.',
        'The second document.',
        'The third document.',
        'The fourth document.',
    ]


def test_jsonl_reads_the_configured_field(tmp_path):
    lines = [{'text': 'not this', 'body': f'document {i}'} for i in range(3)]
    path = write(tmp_path / 'a.jsonl', '\n'.join(json.dumps(r) for r in lines) + '\n\n')
    assert list(read_text_files(path, 'body')) == ['document 0', 'document 1', 'document 2']
    assert list(read_text_files(path)) == ['not this'] * 3


@pytest.mark.parametrize('ext, sep', [('tsv', '\t'), ('csv', ',')])
def test_delimited_reads_the_configured_column(tmp_path, ext, sep):
    rows = [['label', 'sentence'], ['1', 'a first row'], ['0', 'a second row']]
    path = write(tmp_path / f'a.{ext}', '\n'.join(sep.join(r) for r in rows) + '\n')
    assert list(read_text_files(path, 'sentence')) == ['a first row', 'a second row']


def test_csv_quoted_field_with_commas(tmp_path):
    path = write(tmp_path / 'a.csv', 'id,text\n1,"one, two, three"\n2,plain\n')
    assert list(read_text_files(path)) == ['one, two, three', 'plain']


def test_comma_separated_globs_and_mixed_formats(tmp_path):
    (tmp_path / 'x').mkdir()
    write(tmp_path / 'x' / 'a.txt', 'from a txt')
    write(tmp_path / 'x' / 'b.txt', 'from b txt')
    write(tmp_path / 'c.jsonl', json.dumps({'text': 'from jsonl'}) + '\n')
    write(tmp_path / 'd.csv', 'text\nfrom csv\n')
    pattern = f'{tmp_path}/x/*.txt,{tmp_path}/*.jsonl,{tmp_path}/d.csv'
    assert sorted(read_text_files(pattern)) == sorted(
        ['from a txt', 'from b txt', 'from jsonl', 'from csv']
    )


def test_no_matching_file_is_a_data_error(tmp_path):
    pattern = str(tmp_path / 'nothing*.txt')
    with pytest.raises(DataError, match='no files match') as e:
        read_text_files(pattern)
    assert pattern in str(e.value)


def test_unknown_extension_is_a_data_error(tmp_path):
    path = write(tmp_path / 'a.md', '# a heading')
    with pytest.raises(DataError, match='unsupported extension') as e:
        read_text_files(path)
    assert path in str(e.value) and '.md' in str(e.value)


def test_jsonl_line_without_the_field_is_a_data_error(tmp_path):
    path = write(tmp_path / 'a.jsonl', '{"text": "ok"}\n{"body": "no text here"}\n')
    with pytest.raises(DataError) as e:
        read_text_files(path, 'text')
    message = str(e.value)
    assert path in message and 'line 2' in message and "'text'" in message
    assert 'body' in message  # the fields it does have


def test_bad_json_line_is_a_data_error(tmp_path):
    path = write(tmp_path / 'a.jsonl', '{"text": "ok"}\n{"text": oops\n')
    with pytest.raises(DataError, match='not JSON') as e:
        read_text_files(path)
    assert path in str(e.value) and 'line 2' in str(e.value)


@pytest.mark.parametrize('ext, sep', [('tsv', '\t'), ('csv', ',')])
def test_delimited_without_the_column_is_a_data_error(tmp_path, ext, sep):
    path = write(tmp_path / f'a.{ext}', f'label{sep}sentence\n1{sep}a row\n')
    with pytest.raises(DataError) as e:
        read_text_files(path, 'text')
    message = str(e.value)
    assert path in message and "'text'" in message and 'sentence' in message


def many_docs_file(tmp_path, n: int = 100) -> str:
    return write(
        tmp_path / 'docs.jsonl',
        '\n'.join(json.dumps({'text': f'document number {i}'}) for i in range(n)),
    )


def test_load_corpus_holds_out_a_disjoint_stable_eval_split(tmp_path):
    config = data_config(files=many_docs_file(tmp_path), eval_fraction=0.2)
    train, eval_ = load_corpus(config)
    train_docs, eval_docs = list(train), list(eval_)
    assert set(train_docs).isdisjoint(eval_docs)
    assert sorted(train_docs + eval_docs) == sorted(f'document number {i}' for i in range(100))
    assert 8 <= len(eval_docs) <= 35  # about 20 of 100
    again_train, again_eval = load_corpus(config)
    assert list(again_train) == train_docs and list(again_eval) == eval_docs


def test_load_corpus_splits_a_txt_file_of_short_documents(tmp_path):
    path = write(tmp_path / 'a.txt', '\n\n'.join(f'Short document {i}.' for i in range(50)))
    train, eval_ = load_corpus(data_config(files=path, eval_fraction=0.2))
    assert len(train) + len(eval_) == 50
    assert len(eval_) > 0 and set(train).isdisjoint(eval_)


def test_load_corpus_uses_eval_files_when_given(tmp_path):
    eval_path = write(tmp_path / 'eval.txt', 'held out one\n\nheld out two')
    config = data_config(files=many_docs_file(tmp_path), eval_files=eval_path)
    train, eval_ = load_corpus(config)
    assert len(train) == 100  # nothing held out of the training files
    assert sorted(eval_) == ['held out one', 'held out two']


def test_load_corpus_files_override_the_name(tmp_path):
    config = data_config(name='pydoc', files=many_docs_file(tmp_path), eval_fraction=0.1)
    train, eval_ = load_corpus(config)
    assert all(d.startswith('document number') for d in [*train, *eval_])


def test_load_corpus_empty_files_are_a_data_error(tmp_path):
    write(tmp_path / 'empty.txt', '\n\n  \n')
    write(tmp_path / 'empty.jsonl', '')
    with pytest.raises(DataError, match='no documents'):
        load_corpus(data_config(files=f'{tmp_path}/empty.*'))


def test_load_corpus_too_few_documents_to_hold_out(tmp_path):
    path = write(tmp_path / 'one.jsonl', json.dumps({'text': 'only one'}))
    with pytest.raises(DataError, match='eval_fraction'):
        load_corpus(data_config(files=path, eval_fraction=0.05))


def test_unknown_embedded_corpus_is_a_data_error():
    with pytest.raises(DataError, match='unknown embedded corpus'):
        embedded_corpus('no_such_corpus')


def test_embedded_pydoc_corpus_is_english_text():
    docs = embedded_corpus('pydoc')
    assert len(docs) > 100
    assert all(isinstance(d, str) and d.strip() for d in docs)
    words = ' '.join(docs[:50]).lower().split()
    assert words.count('the') > 100
    assert sum(len(d) for d in docs) > 200_000


def test_embedded_pydoc_split_is_disjoint():
    train, eval_ = load_corpus(data_config(name='pydoc', eval_fraction=0.05))
    assert len(train) > 10 * len(eval_) > 0
    assert not set(eval_) & set(train) - {''}


def test_parsing_the_standard_library_says_how_far_it_is(monkeypatch, caplog):
    """The embedded corpus's first read (seconds: `ast` over the standard library, before
    the corpus cache has it) is not a silent stretch of a cold start: a line every
    PROGRESS_SECS, the same documents as without them."""
    import logging

    from data import text

    monkeypatch.setattr(text, 'PROGRESS_SECS', 0.0)  # a line before every file
    with caplog.at_level(logging.INFO):
        docs = text.stdlib_docstrings()
    said = [r.getMessage() for r in caplog.records if 'standard-library files' in r.getMessage()]
    counts = [(int(m.split()[1]), int(m.split()[3])) for m in said]
    total = counts[0][1]
    assert total > 100 and [c for c, _ in counts] == list(range(len(counts))), said[:3]
    assert {t for _, t in counts} == {total} and len(counts) == total
    assert said[0] == f'data: 0 of {total} standard-library files parsed'
    monkeypatch.setattr(text, 'PROGRESS_SECS', 1e9)
    assert text.stdlib_docstrings() == docs


def test_the_docstring_walk_finds_what_ast_walk_finds(monkeypatch):
    """The standard library's docstrings are found by visiting statements only: the same
    documents, in the same order, as walking every node (what built the corpus before)."""
    import ast

    from data import text

    fast = text.stdlib_docstrings()
    monkeypatch.setattr(text, '_statements', ast.walk)
    assert fast == text.stdlib_docstrings()
