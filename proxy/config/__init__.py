"""Load, expand and validate the sidecar's YAML config into frozen dataclasses.

Every problem becomes one ``ConfigError`` that names the file, the key and the
reason, so ``python -m proxy check`` can print it and exit 2.

model.py is the shape (dataclasses, defaults), fields.py the converters each
key goes through, files.py the files it reads (bounded, regular) and its YAML
(aliases bounded), parse.py the top level, apps, pushes and merchants.
"""
from .files import (
    MAX_CONFIG_BYTES,
    MAX_SECRET_FILE_BYTES,
    MAX_YAML_EXPANSION,
    MAX_YAML_NODES,
    FileRefused,
    read_small_file,
)
from .model import *  # noqa: F401,F403
from .model import ConfigError
from .parse import is_loopback, load, parse, resolve_path

__all__ = [
    "ConfigError", "FileRefused", "MAX_CONFIG_BYTES", "MAX_SECRET_FILE_BYTES", "MAX_YAML_EXPANSION", "MAX_YAML_NODES",
    "is_loopback", "load", "parse", "read_small_file", "resolve_path",
]
