"""Encoder, mapper and decoder.

Importing any part of the package fills the mapper registry (captioner/models/registry.py): the
modules that define mappers are imported here, so a name a config gives is always known.
"""

from captioner.models import bridges, mapper  # noqa: F401 - each mapper class registers itself
