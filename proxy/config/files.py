"""Files the config reads (the config itself, secrets and keys) and its YAML:
small regular files only, aliases bounded."""
from __future__ import annotations

import os
import stat
from typing import Any

import yaml

from .model import ConfigError

# ---------------------------------------------------------------- loading

# A config file is a few KiB; a secret or key file well under one. Larger is
# a mistake (or /dev/zero behind a symlink), refused before it fills memory.
MAX_CONFIG_BYTES = 1024 * 1024
MAX_SECRET_FILE_BYTES = 64 * 1024


class FileRefused(Exception):
    """A file that is not a small regular file: why, safe to show."""


def read_small_file(path: str, limit: int) -> bytes:
    """A regular file's bytes, at most `limit`. Opened without blocking (a
    FIFO with no writer would hang open() and read() for ever), checked to be
    a regular file before a byte is read (a FIFO, device or directory is
    refused), and never read past the limit."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = ("a FIFO" if stat.S_ISFIFO(st.st_mode) else "a directory" if stat.S_ISDIR(st.st_mode)
                    else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
                    else "a socket" if stat.S_ISSOCK(st.st_mode) else "not a regular file")
            raise FileRefused(f"is {kind}, not a regular file")
        if st.st_size > limit:
            raise FileRefused(f"is {st.st_size} bytes, over the {limit}-byte limit")
        chunks, size = [], 0
        while chunk := os.read(fd, limit + 1 - size):
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                raise FileRefused(f"is over the {limit}-byte limit")
        return b"".join(chunks)
    finally:
        os.close(fd)


# laughs", not a config: refused before anything walks the expansion. Plain
# anchors and merges (`<<: *defaults`) in a real config stay far below it.
MAX_YAML_NODES = 10_000
MAX_YAML_EXPANSION = 10


def _compose(text: str) -> Any:
    """yaml.safe_load, with the alias expansion bounded (see MAX_YAML_NODES)."""
    node = yaml.compose(text, Loader=yaml.SafeLoader)
    if node is None:
        return None
    limit = max(MAX_YAML_NODES, MAX_YAML_EXPANSION * len(text))
    seen, stack = 0, [node]
    while stack:                          # every node as often as aliases repeat it
        current = stack.pop()
        seen += 1
        if seen > limit:
            raise ConfigError("", "", f"YAML aliases expand to more than {limit} nodes: refused "
                                      "(an alias bomb?)")
        if isinstance(current, yaml.SequenceNode):
            stack.extend(current.value)
        elif isinstance(current, yaml.MappingNode):
            for key, value in current.value:
                stack.extend((key, value))
    return _construct(node)


def _construct(node: Any) -> Any:
    loader = yaml.SafeLoader("")
    try:
        return loader.construct_document(node)
    finally:
        loader.dispose()
