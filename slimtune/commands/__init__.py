"""One module per `slimtune` verb, each with add(parser) (its arguments) and run(args) -> exit code; cli.py
imports a verb's module only when that verb is chosen. Shared pieces: options.py (config arguments and
reading the config from the command line), inference.py (loading a run to answer prompts), run_folder.py."""
