"""Training stages (SFT cold start, GRPO) and the pipeline that chains them."""
