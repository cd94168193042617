"""The Deep Registration Slicer module against Slicer's REAL Python code (parameterNodeWrapper,
ScriptedLoadableModule, util, i18n, SampleData at v5.8.1, v5.10.0 and v5.12.3 from ../shared/slicer/python) on
PyPI slicer-core's MRML (see Testing/slicer_real.py). Checks that need Qt itself are static and cite the Slicer
source lines they encode."""
from __future__ import annotations

import sys

import pytest

from slicer_real import ROOT, SLICER_PYTHON, TAGS, load, missingReason, slicerEnv  # noqa: F401

MODULE_FILE = ROOT / "DeepRegistration" / "DeepRegistration.py"


# ------------------------------------------------------------------------------------------------ the harness
def test_each_tag_loads_its_own_slicer_code_and_leaves_nothing_behind(tmp_path):
    import slicer

    if missingReason(TAGS[0]):
        pytest.skip(missingReason(TAGS[0]))
    coreUtil = slicer.util
    seen = set()
    for tag in TAGS:
        with load(tag, tmp_path / tag) as env:
            for name in ("slicer.util", "slicer.parameterNodeWrapper", "slicer.ScriptedLoadableModule",
                         "slicer.i18n", "SampleData"):
                path = sys.modules[name].__file__
                assert path.startswith(str(SLICER_PYTHON / tag)), (name, path)
                seen.add(path)
            assert slicer.parameterNodeWrapper.wrapper.__file__.startswith(str(SLICER_PYTHON / tag))
            env.loadModule(MODULE_FILE)
            assert "DeepRegistration" in sys.modules
        assert slicer.util is coreUtil and sys.modules["slicer.util"] is coreUtil
        assert "DeepRegistration" not in sys.modules and "qt" not in sys.modules
        assert not [n for n in sys.modules if n.startswith("slicer.parameterNodeWrapper")]
    assert len(seen) == 5 * len(TAGS)
