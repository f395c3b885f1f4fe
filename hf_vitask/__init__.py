"""hf_vitask: turn a Hugging Face vision-language model into a task specialist."""

__version__ = "0.1.0"
