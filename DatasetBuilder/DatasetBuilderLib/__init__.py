"""DatasetBuilder library: Slicer scenes → paired, labeled, de-identified Learn2Reg-layout training sets.

Pure-Python logic plus MRML access through code that PyPI ``slicer-core`` can run headless (``scenes.py``);
the Slicer module ``DatasetBuilder.py`` and the ``deepregistration dataset`` command are thin front ends of
:func:`DatasetBuilderLib.build.build_dataset`.
"""
from __future__ import annotations

BUILDER_VERSION = "0.1.0"
