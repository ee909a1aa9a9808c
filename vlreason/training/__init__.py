"""Training stages (SFT cold start, GRPO) and the pipeline that chains them."""


class TrainingStopped(RuntimeError):
    """A run cannot continue; the message says why and what to change."""
