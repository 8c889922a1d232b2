"""slimtune: fine-tune language models with LoRA and other adapters on small hardware."""
__version__ = "0.1.0"
