"""Batches for training and evaluation: token ids and labels right-padded, images decoded and preprocessed per batch."""

from __future__ import annotations

import logging
import multiprocessing
from typing import Any

import torch
from PIL import Image

from qlora_med.data.images import DEFAULT_MAX_IMAGE_PIXELS, ImageError, load_image, mean_colour, to_square
from qlora_med.errors import DataError
from qlora_med.model.family import ImageSpec
from qlora_med.prompts.templates import IGNORE_INDEX

logger = logging.getLogger(__name__)


def pad_right(
    ids: list[list[int]], labels: list[list[int]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad token ids (with ``pad_id``) and labels (with the ignore index); returns ids, labels, mask."""
    width = max(len(row) for row in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    padded_labels = torch.full((len(ids), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(ids), width), dtype=torch.long)
    for row, (row_ids, row_labels) in enumerate(zip(ids, labels, strict=True)):
        input_ids[row, : len(row_ids)] = torch.tensor(row_ids)
        padded_labels[row, : len(row_ids)] = torch.tensor(row_labels)
        attention_mask[row, : len(row_ids)] = 1
    return input_ids, padded_labels, attention_mask


class VisionCollator:
    """Loads and preprocesses the batch's images and pads token ids / labels.

    With ``on_bad_record="skip"`` an unreadable image, or one over ``max_image_pixels`` (refused from its header,
    before decoding), drops that sample from the batch (counted in ``self.skipped``, shared with DataLoader worker
    processes); otherwise it raises a DataError naming the file and record. Non-square images are padded with
    :func:`~qlora_med.data.images.pad_colour` of the processor's mean, as LLaVA pads them. With ``images`` (the
    model's :class:`~qlora_med.model.family.ImageSpec`) an any-res / dynamic family's squares are resized to its
    side, the image processor's outputs the family's forward takes are passed on (``image_sizes``,
    ``image_grid_thw``), and Gemma 3 gets ``token_type_ids`` (1 on image tokens).
    """

    def __init__(self, processor, image_aspect: str, on_bad_record: str = "error",
                 max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, images: ImageSpec | None = None) -> None:
        self.processor = processor
        self.images = images
        self.image_aspect = image_aspect
        self.on_bad_record = on_bad_record
        self.max_image_pixels = max_image_pixels
        self.background = mean_colour(processor.image_processor)
        self.pad_id = processor.tokenizer.pad_token_id
        self._skipped = multiprocessing.Value("q", 0)  # workers count into shared memory

    @property
    def skipped(self) -> int:
        """Samples dropped for unreadable images, in this process and its DataLoader workers."""
        return self._skipped.value

    def pixel_values(self, paths: list[str | bytes], ids: list[str]) -> tuple[torch.Tensor, list[int]]:
        """Preprocessed images (files, or encoded bytes embedded in parquet) and the indices that were readable."""
        inputs, kept = self.image_inputs(paths, ids)
        return inputs["pixel_values"], kept

    def image_inputs(self, paths: list[str | bytes], ids: list[str]) -> tuple[dict[str, torch.Tensor], list[int]]:
        """The image processor's outputs the model takes (``pixel_values``, ...) and the readable indices."""
        images, kept = [], []
        for i, (path, rid) in enumerate(zip(paths, ids, strict=True)):
            try:
                img = load_image(path, self.background, rid, self.max_image_pixels)
            except ImageError as err:
                if self.on_bad_record == "error":
                    raise
                with self._skipped.get_lock():
                    self._skipped.value += 1
                logger.warning("skipping record %s (%s): %s", rid, err.reason, err.detail)
                continue
            img = to_square(img, self.image_aspect, self.background)
            if self.images is not None and self.images.side:
                img = img.resize((self.images.side, self.images.side), Image.Resampling.BICUBIC)
            images.append(img)
            kept.append(i)
        if not images:
            raise DataError(f"every image in a batch was unreadable: {ids}")
        out = self.processor.image_processor(images, return_tensors="pt")
        keys = self.images.family.batch_keys if self.images is not None else ("pixel_values",)
        return {k: out[k] for k in keys}, kept

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        images = [f["image"] if f.get("image_bytes") is None else f["image_bytes"] for f in features]
        image_inputs, kept = self.image_inputs(images, [f["id"] for f in features])
        features = [features[i] for i in kept]
        input_ids, labels, attention_mask = pad_right(
            [f["input_ids"] for f in features], [f["labels"] for f in features], self.pad_id
        )
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, **image_inputs}
        if self.images is not None and self.images.family.token_type_ids:
            batch["token_type_ids"] = (input_ids == self.images.image_token_id).long()
        return batch
