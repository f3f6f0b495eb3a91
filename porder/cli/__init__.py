"""The porder command line: one click group, each command parses, calls one
library function, and reports. Library errors become one-line messages.

The group is here; the commands live one module per command group:
:mod:`.reorder` (reorder, inspect, show, measures), :mod:`.train` (train,
compare), :mod:`.scale` (merge, and ``reorder --dask``), :mod:`.export` (export)
and :mod:`.info` (info); :mod:`.common` holds what they share (the grammar's
option classes and ``--json``, error mapping, interruption, progress lines, the
kernel compile message). The grammar is documented in ``docs/cli-grammar.md``.
"""
from __future__ import annotations

import click

from .._version import __version__
from . import export as _export
from . import info as _info
from . import reorder as _reorder
from . import scale as _scale
from . import train as _train
from .common import CONTEXT


@click.group(context_settings=CONTEXT)
@click.version_option(__version__, "-V", "--version", prog_name="porder")
def main():
    """porder: information-theoretic patch ordering (POR) of image datasets.

    Cut every image into square patches, order them by a measure (mutual
    information, entropy, SSIM, ...), rebuild the image, and cache the result
    as HDF5 for training (Ghebrechristos & Alaghband's POR algorithm).

    \b
    Typical use:
      porder reorder --measure mi --patch 8 cifar-100-python/ out.h5
      porder inspect out.h5
      porder show out.h5 -o grid.png
      porder train out.h5 --arch vgg
      porder info                      # versions, kernels' cache, GPU, threads

    Every command that produces a result takes --json (one JSON document on
    stdout). Shell completion: eval "$(_PORDER_COMPLETE=bash_source porder)"
    (zsh_source, fish_source for zsh and fish).
    """


for _command in (_reorder.reorder, _reorder.inspect, _reorder.show, _reorder.measures,
                 _train.train, _train.compare, _scale.merge, _export.export, _info.info):
    main.add_command(_command)
