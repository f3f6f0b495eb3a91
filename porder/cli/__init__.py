"""The porder command line: one click group, each command parses, calls one
library function, and reports. Library errors become one-line messages.

The group is here; the commands live one module per command group:
:mod:`.reorder` (reorder, inspect, show, measures), :mod:`.train` (train,
compare) and :mod:`.scale` (merge, and ``reorder --dask``), :mod:`.export` (export); :mod:`.common`
holds what they share (error mapping, interruption, progress lines).
"""
from __future__ import annotations

import click

from .._version import __version__
from . import export as _export
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
    """


for _command in (_reorder.reorder, _reorder.inspect, _reorder.show, _reorder.measures,
                 _train.train, _train.compare, _scale.merge, _export.export):
    main.add_command(_command)
