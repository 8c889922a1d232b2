"""The one typed config: nested dataclasses filled from YAML plus dotted command-line overrides.

fields.py   the dataclass tree, a docstring under each field
convert.py  values against the declared types (command-line text converted, YAML values checked), ConfigError
aliases.py  the key an unknown key meant (names from other trainers, then spelling)
checks.py   choices, numeric ranges, rules between keys; method.* fields the method ignores
loader.py   load(yaml, overrides), from_dict, dump
docs.py     field_docs and explain (`slimtune train --help-config`)
"""
from __future__ import annotations

from .aliases import ALIASES
from .checks import CHOICES, IA3_FEEDFORWARD, METHOD_FIELDS, RANGES, unused, validate
from .convert import ConfigError
from .docs import explain, field_docs
from .fields import METHODS, PROMPT_METHODS, Config, DataConfig, MethodConfig, ModelConfig, TrainConfig
from .loader import dump, from_dict, load, to_dict

__all__ = ["ALIASES", "CHOICES", "IA3_FEEDFORWARD", "METHOD_FIELDS", "METHODS", "PROMPT_METHODS", "RANGES", "Config",
           "ConfigError", "DataConfig", "MethodConfig", "ModelConfig", "TrainConfig", "dump", "explain", "field_docs",
           "from_dict", "load", "to_dict", "unused", "validate"]
