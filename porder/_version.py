"""porder's version, in a module of its own: the package root, the CLI's ``--version``
and every file writer (HDF5 attributes, export manifests) read it here, so none of
them imports the package root. ``pyproject.toml`` reads it too (``version = {attr}``)."""

__version__ = "0.1.0"
