"""MRML glue of the DeepRegistration module: conversions between Slicer nodes and the engine, and background runs.

Imports only what PyPI ``slicer-core`` provides (``slicer``, ``vtk``) plus numpy, SimpleITK and the torch-free
parts of the engine (:mod:`DeepRegistrationLib.core.grid`, ``image``, ``io``, ``errors``), so it is tested with a real
``vtkMRMLScene`` in pytest and never loads torch into the Slicer process (the registration runs in a subprocess).

- :mod:`.nodes`: volume ↔ :class:`~DeepRegistrationLib.core.image.Image`, segmentation/labelmap → label array,
  markups ↔ LPS points, engine transform → Slicer transform node, Jacobian volume, metrics table.
- :mod:`.run`: :class:`~.run.RegistrationJob` (inputs to a temporary folder, ``python -m
  DeepRegistrationLib.apps.worker`` subprocess, ``poll()``/``cancel()``, results into nodes) and
  :func:`~.run.register` (blocking, for the Python console).
"""
