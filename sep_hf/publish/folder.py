"""A protected dataset as a Hub-layout folder: parquet shards plus the card, one ``upload_folder`` away.

``write_hub_layout`` writes exactly what ``DatasetDict.push_to_hub`` would put in a repo (``configs``
and ``dataset_info`` in the card's YAML), so ``load_dataset(folder)`` works locally and the data, the
card and the sample grid are published in a single commit. ``embed_image_bytes`` puts every image's
bytes in the table, so no published row points at the owner's disk.
"""

from __future__ import annotations

import math as _math
from pathlib import Path

from datasets.info import DatasetInfo, DatasetInfosDict
from datasets.splits import SplitDict, SplitInfo
from datasets.table import embed_table_storage
from datasets.utils.metadata import MetadataConfigs
from huggingface_hub import DatasetCard


def embed_image_bytes(split):
    """The split with every image's bytes inside the table (an ImageFolder row holds only a local path):
    what ``push_to_hub`` does, so a published split never points at the owner's disk. Paths keep only
    the file name."""

    if split.num_rows == 0:
        return split
    return split.with_format("arrow").map(embed_table_storage, batched=True, desc="Embedding image bytes").with_format(None)


_SHARD_BYTES = 500 * 1024 * 1024


def write_hub_layout(splits, folder: str | Path, card_data, card_body: str, config_name: str = "default") -> Path:
    """Write ``splits`` as ``folder/data/{split}-XXXXX-of-YYYYY.parquet`` plus a README card.

    The folder is exactly what ``push_to_hub`` would put in a repo (``configs`` and
    ``dataset_info`` in the card's YAML), so ``load_dataset(folder)`` works locally and one
    ``upload_folder`` publishes data and card in a single commit.
    """


    folder = Path(folder)
    data_dir = folder / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    for stale in data_dir.glob("*.parquet"):
        stale.unlink()
    features = next(iter(splits.values())).features
    info = DatasetInfo(features=features, splits=SplitDict())
    info.dataset_size = 0
    for name, split in splits.items():
        num_bytes = split.data.nbytes
        num_shards = max(1, _math.ceil(num_bytes / _SHARD_BYTES))
        for index in range(num_shards):
            shard = split.shard(num_shards, index, contiguous=True)
            shard.to_parquet(str(data_dir / f"{name}-{index:05d}-of-{num_shards:05d}.parquet"))
        info.splits.add(SplitInfo(name=name, num_bytes=num_bytes, num_examples=split.num_rows))
        info.dataset_size += num_bytes
    DatasetInfosDict({config_name: info}).to_dataset_card_data(card_data)
    MetadataConfigs(
        {config_name: {"data_files": [{"split": name, "path": f"data/{name}-*"} for name in splits]}}
    ).to_dataset_card_data(card_data)
    DatasetCard(f"---\n{card_data.to_yaml()}\n---\n{card_body}").save(folder / "README.md")
    return folder
