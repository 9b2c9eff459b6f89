"""Config-level entry to preference sources: resolves built-in data specs, then reads the source."""
from __future__ import annotations

from diffalign.config import DataConfig


def resolve_data_path(path: str) -> str:
    """'toy:pairs[?n=..]' -> the toy parquet materialised under diffalign_home(); other paths unchanged."""
    if path.startswith("toy:"):
        from diffalign.data.toy import resolve_toy_path
        from diffalign.paths import diffalign_home

        return str(resolve_toy_path(path, diffalign_home()))
    return path


def load_source_for(data: DataConfig):
    """Read ``data.path`` with the config's tie, bad-row, caption-column and score-column options."""
    from diffalign.data.preference import load_preference_source, score_columns_from

    if not data.path:
        raise ValueError("data.path is empty: give a parquet file/folder, a datasets folder, a .jsonl/.csv or toy:pairs")
    return load_preference_source(resolve_data_path(data.path), split=data.split, caption_column=data.caption_column,
                                  ties=data.ties, on_error=data.on_error, max_pairs=data.max_pairs,
                                  score_columns=score_columns_from(data.score_column),
                                  dimension_weights=data.dimension_weights)


def dataset_for(data: DataConfig, source, seed: int):
    """The on-the-fly :class:`PreferencePairDataset` of ``source`` with the config's augmentation and video settings."""
    from diffalign.data.preference import PreferencePairDataset
    from diffalign.data.transforms import JointTransform

    return PreferencePairDataset(source, JointTransform(data.resolution, data.center_crop, data.random_flip, width=data.width),
                                 seed=seed, on_error=data.on_error, num_frames=data.num_frames,
                                 fps=data.fps if data.num_frames is not None else None)
