"""Layer 0, torch-free: errors, configuration, progress and cancel, background jobs, the one geometry type ``Grid`` and ``Image``.

Importable in Slicer's main process (no torch)."""
