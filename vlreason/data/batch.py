"""Load the images of a batch of samples at training time, skipping (and counting) samples
whose files went bad after the data was checked, so one broken file cannot end a run."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from PIL import Image

from vlreason.data.schema import Sample
from vlreason.vision.images import ImageLoadError, load_image

logger = logging.getLogger(__name__)


def load_sample_images(samples: Sequence[Sample]) -> tuple[list[Sample], list[list[Image.Image]], int]:
    """Decode each sample's images.

    Returns:
        The samples whose images all loaded, their images (one list per sample), and how many
        samples were skipped (each skip is logged with the sample's ``file:line``).
    """
    kept, images, skipped = [], [], 0
    for sample in samples:
        try:
            images.append([load_image(path) for path in sample.images])
        except ImageLoadError as exc:
            skipped += 1
            logger.warning("%s: skipping the sample: %s", sample.source, exc)
            continue
        kept.append(sample)
    return kept, images, skipped
