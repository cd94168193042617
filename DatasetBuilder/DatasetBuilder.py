import slicer
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)

#
# DatasetBuilder
#


class DatasetBuilder(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "Dataset Builder"
        self.parent.categories = ["Registration"]
        self.parent.dependencies = []
        self.parent.contributors = ["The DeepRegistration authors"]
        self.parent.helpText = """
Dataset Builder will turn Slicer scenes (image pairs with segmentations and landmarks) into de-identified
training sets in the Learn2Reg layout (imagesTr/labelsTr/keypointsTr and a dataset.json) for training
registration models in the Deep Registration module.
<br><br>
<b>This version contains only the module shell:</b> no dataset is built yet.
<br><br>
<b>Intended use:</b> research use only, not for clinical decisions.
"""
        self.parent.acknowledgementText = """
Part of the DeepRegistration extension. Module layout follows the 3D Slicer extension templates.
"""


#
# DatasetBuilderWidget
#


class DatasetBuilderWidget(ScriptedLoadableModuleWidget):
    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        import qt

        label = qt.QLabel("Dataset Builder is not implemented yet: this version contains only the module shell.\n"
                          "It will export Slicer scenes as de-identified Learn2Reg-layout training sets.")
        label.wordWrap = True
        self.layout.addWidget(label)
        self.layout.addStretch(1)


#
# DatasetBuilderLogic
#


class DatasetBuilderLogic(ScriptedLoadableModuleLogic):
    """Will hold the scene → Learn2Reg export; it has no functionality in this version."""

    implemented = False


#
# DatasetBuilderTest
#


class DatasetBuilderTest(ScriptedLoadableModuleTest):
    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_ModuleShell()

    def test_ModuleShell(self):
        """The shell loads and says honestly that it has no functionality yet."""
        logic = DatasetBuilderLogic()
        self.assertFalse(logic.implemented)
        self.delayDisplay("Test passed")
