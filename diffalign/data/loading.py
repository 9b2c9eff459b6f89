"""Config-level entry to training data: resolves built-in data specs, tells pairs from unpaired labelled images,
then reads the source and builds its dataset and collate function.

Two kinds of data feed the one training loop:

* ``pairs`` (:mod:`diffalign.data.preference`): preference pairs, every objective;
* ``unpaired`` (:mod:`diffalign.data.unpaired`): single images labelled desirable / undesirable, for objectives
  that train on single samples (``Objective.sample_fn``: Diffusion-KTO).

:func:`data_kind` decides from the column names (or, with ``cache.dir``, from the cache's manifest) without
reading any row, so a config that pairs an objective with the wrong kind of data fails before the model loads.
"""
from __future__ import annotations

from pathlib import Path

from diffalign.config import DataConfig, RunConfig


def resolve_data_path(path: str) -> str:
    """'toy:pairs[?n=..]' / 'toy:unpaired[?n=..]' -> the toy parquet materialised under diffalign_home(); other
    paths unchanged."""
    if path.startswith("toy:"):
        from diffalign.data.toy import resolve_toy_path
        from diffalign.paths import diffalign_home

        return str(resolve_toy_path(path, diffalign_home()))
    return path


def data_kind_of(data: DataConfig) -> str:
    """'pairs' or 'unpaired' for ``data.path``, from its column names alone (see diffalign.data.unpaired)."""
    from diffalign.data.unpaired import detect_data_kind

    if data.path.startswith("toy:"):  # known from the spec: no need to write the toy file
        return detect_data_kind(data.path)
    return detect_data_kind(data.path, data.split, data.label_column)


def data_kind(cfg: RunConfig) -> str:
    """'pairs' or 'unpaired': what the run will train on. With ``cache.dir`` holding a manifest, the cache's kind
    (caches written before unpaired data existed are pairs); otherwise :func:`data_kind_of` ``(cfg.data)``."""
    if cfg.cache.dir:
        import json

        from diffalign.data.cache import MANIFEST

        manifest = Path(cfg.cache.dir) / MANIFEST
        if manifest.is_file():
            return json.loads(manifest.read_text()).get("kind", "pairs")
    return data_kind_of(cfg.data)


def load_source_for(data: DataConfig):
    """Read ``data.path`` with the config's tie, bad-row, caption-, label- and score-column options: a
    :class:`~diffalign.data.preference.PreferenceSource` for pairs, a
    :class:`~diffalign.data.unpaired.LabelledImageSource` for unpaired labelled images (``source.kind`` says which)."""
    from diffalign.data.preference import DataError, load_preference_source, score_columns_from

    if not data.path:
        raise ValueError("data.path is empty: give a parquet file/folder, a datasets folder, a .jsonl/.csv, toy:pairs "
                         "or toy:unpaired")
    path = resolve_data_path(data.path)
    if data_kind_of(data) == "unpaired":
        from diffalign.data.unpaired import load_unpaired_source

        if data.score_column is not None:
            raise DataError(f"{path}: unpaired labelled images carry a label, not per-image scores; "
                            "data.score_column does not apply to them (set it to null).")
        return load_unpaired_source(path, split=data.split, caption_column=data.caption_column,
                                    label_column=data.label_column, on_error=data.on_error, max_samples=data.max_pairs)
    return load_preference_source(path, split=data.split, caption_column=data.caption_column,
                                  ties=data.ties, on_error=data.on_error, max_pairs=data.max_pairs,
                                  score_columns=score_columns_from(data.score_column),
                                  dimension_weights=data.dimension_weights)


def dataset_for(data: DataConfig, source, seed: int):
    """The on-the-fly dataset of ``source`` with the config's augmentation (and, for pairs, video) settings: a
    :class:`~diffalign.data.preference.PreferencePairDataset` or a
    :class:`~diffalign.data.unpaired.LabelledImageDataset`."""
    from diffalign.data.transforms import JointTransform

    transform = JointTransform(data.resolution, data.center_crop, data.random_flip, width=data.width)
    if source.kind == "unpaired":
        from diffalign.data.unpaired import LabelledImageDataset

        return LabelledImageDataset(source, transform, seed=seed, on_error=data.on_error)
    from diffalign.data.preference import PreferencePairDataset

    return PreferencePairDataset(source, transform, seed=seed, on_error=data.on_error, num_frames=data.num_frames,
                                 fps=data.fps if data.num_frames is not None else None)


def collate_for(source):
    """The collate function that batches ``source``'s dataset items (pairs or labelled images)."""
    if source.kind == "unpaired":
        from diffalign.data.unpaired import collate_samples

        return collate_samples
    from diffalign.data.preference import collate_pairs

    return collate_pairs
