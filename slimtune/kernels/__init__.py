"""Fast ops, each beside its plain-PyTorch twin in reference.py."""
