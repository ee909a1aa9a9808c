"""Training stages (SFT cold start, GRPO) and the pipeline that chains them."""


class TrainingStopped(RuntimeError):
    """A run cannot continue; the message says why and what to change."""


class RankFailed(RuntimeError):
    """The main process of a multi-process run stopped on an error; the other ranks stop with its message."""
