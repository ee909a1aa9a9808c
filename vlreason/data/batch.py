"""Load the media of a batch of samples at training time (images, and the sampled frames of
videos), skipping (and counting) samples whose files went bad after the data was checked, so one
broken file cannot end a run."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from PIL import Image

from vlreason.data.schema import Sample
from vlreason.vision.images import ImageLoadError, load_image
from vlreason.vision.video import Clip, ClipReader, VideoError

logger = logging.getLogger(__name__)


@dataclass
class Media:
    """One sample's decoded media: its images (original resolution) and its videos' clips."""

    images: list[Image.Image] = field(default_factory=list)
    clips: list[Clip] = field(default_factory=list)


def load_sample_media(samples: Sequence[Sample], read_clip: ClipReader | None = None
                      ) -> tuple[list[Sample], list[Media], int]:
    """Decode each sample's images and videos (``read_clip``; a sample with videos and no reader
    is a programming error).

    Returns:
        The samples whose media all loaded, their media (one per sample), and how many samples
        were skipped (each skip is logged with the sample's ``file:line``).
    """
    kept, media, skipped = [], [], 0
    for sample in samples:
        try:
            if sample.videos and read_clip is None:
                raise ValueError(f"{sample.source}: has videos but no video reader was given")
            loaded = Media([load_image(path) for path in sample.images],
                           [read_clip(path) for path in sample.videos] if sample.videos else [])
        except (ImageLoadError, VideoError) as exc:
            skipped += 1
            logger.warning("%s: skipping the sample: %s", sample.source, exc)
            continue
        kept.append(sample)
        media.append(loaded)
    return kept, media, skipped
