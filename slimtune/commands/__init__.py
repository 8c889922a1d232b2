"""One module per `slimtune` verb, each with run(args) -> exit code; every verb's arguments are in
arguments.py, which loads nothing heavy, and cli.py imports a verb's module only when that verb runs (not for
its --help or a usage error). Shared pieces: options.py (reading the config from the command line),
inference.py (what chat and generate write: checked before the model loads, and written atomically)."""
