"""TFDS access for every source of the catalogue (text, images, image-text pairs): a prepared
split read with `tfds.data_source` (array_record, no TensorFlow), never downloaded here."""

from core.errors import DataError


def open_split(name: str, split: str, data_dir: str | None):
    """`tfds.data_source` of a prepared dataset; never downloads nor prepares one."""
    import tensorflow_datasets as tfds

    try:
        # download=False: a run only reads a prepared dataset; tfds' default would start
        # downloading and preparing a catalog dataset (possibly hundreds of GB, on every
        # host at once) into data_dir.
        return tfds.data_source(name, split=split, data_dir=data_dir or None, download=False)
    except Exception as e:  # tfds raises several types for a dataset not prepared
        raise DataError(
            f'TFDS dataset {name!r} split {split!r} could not be opened from '
            f'{data_dir or "the default data_dir"} ({type(e).__name__}: {e}). Prepare it '
            'first (tfds build, file_format=array_record) and pass --config.data.data_dir, '
            'or use --config.data.files for local files'
        ) from e


def require_feature(name: str, first: dict, field: str, key: str) -> None:
    """A DataError unless the first record `first` (empty: no records) has feature `field`,
    named by `--config.data.<key>`."""
    if first and field not in first:
        raise DataError(
            f'TFDS dataset {name!r} has no feature {field!r} (features: {sorted(first)}); '
            f'set --config.data.{key}'
        )
