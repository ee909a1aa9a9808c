"""The built-in ``select_frames`` tool (VR-Thinker's select-frame operation): look again at chosen
moments of a prompt video, at image resolution instead of the video's frame budget.

A prompt shows a video as a few small frames (the ``video`` section's budget); the model asks for
frames by number or by a time range, and gets them decoded again from the file, at full size (the
observation encoder fits them to the model's image pixel budget, as it does ``crop``'s region),
each labelled with its frame number and time. How many images a trajectory may see in all is
``agent.max_images``; calls are counted per tool in the logs like ``crop``'s.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from vlreason.tools.api import Tool, ToolContext, ToolError, ToolResult, register_tool
from vlreason.vision.video import Clip, FrameSampling, VideoError, read_video


@register_tool("select_frames")
class SelectFrames(Tool):
    """Look closer at moments of a video: returns the chosen frames at higher resolution, each
    with its frame number and time in seconds.

    Options: ``max_frames``, the frames one call may return (default 4).
    """

    def __init__(self, max_frames: int = 4):
        if max_frames < 1:
            raise ValueError(f"max_frames must be >= 1, got {max_frames}")
        self.max_frames = max_frames

    def run(self, context: ToolContext, frames: list[int] = (), time_range: list[float] = (),
            video: int = 0) -> ToolResult:
        """Decode the chosen frames of one of the conversation's videos.

        Args:
            frames: frame numbers to look at (0 is the video's first frame); give this or time_range.
            time_range: [start, end] in seconds; frames spread evenly over it are returned.
            video: which video of the conversation, 0 for the first.
        """
        clip = _clip(context, video)
        if frames and time_range:
            raise ToolError("give frames or time_range, not both")
        sampling = self._by_numbers(clip, list(frames)) if frames else self._by_time(clip, list(time_range))
        try:
            chosen = read_video(clip.path, sampling, clip.info.backend)
        except VideoError as exc:
            raise ToolError(str(exc)) from exc
        labels = ", ".join(f"{index} ({seconds:.2f} s)" for index, seconds in zip(chosen.indices, chosen.timestamps,
                                                                                  strict=True))
        return ToolResult(text=f"Frames {labels} of video {video}.",
                          images=[Image.fromarray(frame) for frame in chosen.frames])

    def _by_numbers(self, clip: Clip, numbers: list[int]) -> FrameSampling:
        last = clip.info.frame_count - 1
        if len(set(numbers)) > self.max_frames:
            raise ToolError(f"at most {self.max_frames} frames per call, got {len(set(numbers))}")
        outside = [n for n in numbers if not 0 <= n <= last]
        if outside:
            raise ToolError(f"frame numbers run from 0 to {last}; {outside} are outside")
        return FrameSampling(indices=tuple(sorted(set(numbers))))

    def _by_time(self, clip: Clip, time_range: list[float]) -> FrameSampling:
        duration = clip.info.duration_s
        if not time_range:
            raise ToolError("give frames (frame numbers) or time_range ([start, end] in seconds)")
        if len(time_range) != 2 or not 0 <= time_range[0] < time_range[1]:
            raise ToolError(f"time_range must be [start, end] in seconds with 0 <= start < end, got {time_range}")
        start, end = time_range[0], min(time_range[1], duration)
        if start >= duration:
            raise ToolError(f"the video lasts {duration:.2f} s; start {start} is past its end")
        seconds = np.linspace(start, end, self.max_frames, endpoint=end < duration)
        return FrameSampling(timestamps=tuple(float(s) for s in seconds))


def _clip(context: ToolContext, video: int) -> Clip:
    if not context.clips:
        raise ToolError("there is no video in this conversation")
    if not 0 <= video < len(context.clips):
        raise ToolError(f"video must be between 0 and {len(context.clips) - 1}, got {video}")
    return context.clips[video]
