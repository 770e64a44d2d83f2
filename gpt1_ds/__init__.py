"""gpt1-ds: GPT-1 pretraining and fine-tuning on DeepSpeed."""

__version__ = "0.1.0"
