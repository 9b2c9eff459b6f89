"""Training data: preference-pair sources (Pick-a-Pic parquet, datasets folders, .jsonl/.csv, hub ids, toy data),
unpaired labelled images for Diffusion-KTO (diffalign.data.unpaired), joint pair augmentation, and the torch
datasets / collate functions used for on-the-fly training and caching."""
from diffalign.data.preference import (
    DataError,
    PairRecord,
    PreferencePairDataset,
    PreferenceSource,
    SourceCounts,
    collate_pairs,
    decode_image,
    default_cache_root,
    load_preference_source,
    validate_images,
)
from diffalign.data.toy import resolve_toy_path, write_toy_pairs, write_toy_unpaired
from diffalign.data.transforms import JointTransform, PairMeta, pair_generator
from diffalign.data.unpaired import (
    LabelledImageDataset,
    LabelledImageSource,
    SampleRecord,
    collate_samples,
    detect_data_kind,
    load_unpaired_source,
    parse_binary_label,
)

__all__ = [
    "DataError",
    "JointTransform",
    "LabelledImageDataset",
    "LabelledImageSource",
    "PairMeta",
    "PairRecord",
    "PreferencePairDataset",
    "PreferenceSource",
    "SampleRecord",
    "SourceCounts",
    "collate_pairs",
    "collate_samples",
    "decode_image",
    "default_cache_root",
    "detect_data_kind",
    "load_preference_source",
    "load_unpaired_source",
    "pair_generator",
    "parse_binary_label",
    "resolve_toy_path",
    "validate_images",
    "write_toy_pairs",
    "write_toy_unpaired",
]
