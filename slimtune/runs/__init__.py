"""A run folder: everything that reads or writes one, below the engine that trains into it.

    ownership.py    what slimtune wrote there (the manifest: what --overwrite may remove), who trains there (lock)
    adapter.py      the trained part in peft's format (or slimtune's trained parts) beside the resolved config.yaml
    checks.py       whether a folder is a finished run, checked before any model loads
    checkpoint.py   step folders written atomically, the newest complete one found for --resume
    sharded.py      full fine-tuning checkpoints written by every rank through DCP
    ranks.py        which of torchrun's processes this is: rank 0 writes, all wait
    signals.py      SIGINT/SIGTERM/SIGHUP as a save at the next step; dying with a parent process
    metrics_log.py  metrics.jsonl, TensorBoard scalars and the progress bar

Loading a run's trained model for use (base model, dtype, trust) is slimtune/trained.py, above the engine.
"""
