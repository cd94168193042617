"""The "Sequence / template" section of the Deep Registration module: thin Qt over
:mod:`DeepRegistrationSlicerLib.sequences`.

Task "Motion-correct a sequence": a volume sequence (``vtkMRMLSequenceNode``), the reference (first item, the item
the sequence browser shows, or the mean of all items) and "chain" → :class:`~DeepRegistrationSlicerLib.sequences.SequenceJob`;
the transform sequence and the motion-corrected sequence are added to the input's browser. Task "Build a template":
the checked volumes and the number of passes → :class:`~DeepRegistrationSlicerLib.sequences.TemplateJob`. Both use
the module's preset and Advanced options (read from its parameter node when Run is clicked), run in the background
(progress bar, Cancel stops the worker and changes nothing) and are polled from a timer, as the module's Apply.
"""
from __future__ import annotations

import ctk
import qt

import slicer
from slicer.i18n import tr as _

TASKS = ("sequence", "template")


class WorkflowSection:
    """The collapsible section (see the module docstring).

    Args:
        parentLayout: The layout the section is added to (the module widget's ``layout``).
        parameterNodeGetter: ``() -> parameter node or None``: the module's parameter node, read when Run is
            clicked (preset, device, similarity, regularization weight, spacing, iterations, diffeomorphic).
    """

    def __init__(self, parentLayout, parameterNodeGetter=None):
        self.parameterNodeGetter = parameterNodeGetter or (lambda: None)
        self._job = None
        self.lastResult = None
        self._timer = qt.QTimer()
        self._timer.setInterval(200)
        self._timer.connect("timeout()", self.onPoll)

        self.collapsibleButton = ctk.ctkCollapsibleButton()
        self.collapsibleButton.text = _("Sequence / template")
        self.collapsibleButton.collapsed = True
        parentLayout.addWidget(self.collapsibleButton)
        form = qt.QFormLayout(self.collapsibleButton)

        self.taskComboBox = qt.QComboBox()
        self.taskComboBox.addItem(_("Motion-correct a sequence"))
        self.taskComboBox.addItem(_("Build a template"))
        self.taskComboBox.toolTip = _("Register every frame of a volume sequence onto a reference, or build an "
                                      "unbiased template of several volumes. Uses the preset and Advanced options "
                                      "above.")
        form.addRow(_("Task:"), self.taskComboBox)

        self.sequenceSelector = slicer.qMRMLNodeComboBox()
        self.sequenceSelector.nodeTypes = ["vtkMRMLSequenceNode"]
        self.sequenceSelector.addEnabled = False
        self.sequenceSelector.removeEnabled = False
        self.sequenceSelector.noneEnabled = True
        self.sequenceSelector.toolTip = _("A sequence of scalar volumes of one geometry (e.g. a 4D CT or a cine "
                                          "loaded as a volume sequence).")
        self.sequenceSelector.setMRMLScene(slicer.mrmlScene)
        form.addRow(_("Volume sequence:"), self.sequenceSelector)

        self.referenceComboBox = qt.QComboBox()
        for text in (_("first item"), _("item shown now"), _("mean of all items")):
            self.referenceComboBox.addItem(text)
        self.referenceComboBox.toolTip = _("The frame every other frame is registered onto.")
        form.addRow(_("Reference:"), self.referenceComboBox)

        self.chainCheckBox = qt.QCheckBox()
        self.chainCheckBox.checked = False
        self.chainCheckBox.toolTip = _("Register each frame onto its neighbour and compose, then refine against the "
                                       "reference: for large motion (slower).")
        form.addRow(_("Chain neighbours:"), self.chainCheckBox)

        self.volumesSelector = slicer.qMRMLCheckableNodeComboBox()
        self.volumesSelector.nodeTypes = ["vtkMRMLScalarVolumeNode"]
        self.volumesSelector.hideChildNodeTypes = ["vtkMRMLLabelMapVolumeNode"]
        self.volumesSelector.toolTip = _("The subject volumes (at least 2); the template lies on the first one's "
                                         "grid.")
        self.volumesSelector.setMRMLScene(slicer.mrmlScene)
        form.addRow(_("Template volumes:"), self.volumesSelector)

        self.passesSpinBox = qt.QSpinBox()
        self.passesSpinBox.minimum, self.passesSpinBox.maximum, self.passesSpinBox.value = 1, 10, 3
        self.passesSpinBox.toolTip = _("Deformable template passes (each registers every volume onto the current "
                                       "template).")
        form.addRow(_("Template passes:"), self.passesSpinBox)

        buttons = qt.QHBoxLayout()
        self.runButton = qt.QPushButton(_("Run"))
        self.runButton.toolTip = _("Run in the background; you can keep working.")
        self.cancelButton = qt.QPushButton(_("Cancel"))
        self.cancelButton.enabled = False
        buttons.addWidget(self.runButton)
        buttons.addWidget(self.cancelButton)
        form.addRow(buttons)
        self.progressBar = qt.QProgressBar()
        self.progressBar.hide()
        form.addRow(self.progressBar)
        self.statusLabel = qt.QLabel()
        self.statusLabel.wordWrap = True
        form.addRow(self.statusLabel)

        self.taskComboBox.connect("currentIndexChanged(int)", self.onTaskChanged)
        self.runButton.connect("clicked(bool)", self.onRun)
        self.cancelButton.connect("clicked(bool)", self.onCancel)
        self.onTaskChanged(0)

    # ------------------------------------------------------------------------------------------- state
    @property
    def task(self) -> str:
        return TASKS[min(max(int(self.taskComboBox.currentIndex), 0), len(TASKS) - 1)]

    def onTaskChanged(self, index=None) -> None:
        sequence = self.task == "sequence"
        for widget in (self.sequenceSelector, self.referenceComboBox, self.chainCheckBox):
            widget.enabled = sequence
        for widget in (self.volumesSelector, self.passesSpinBox):
            widget.enabled = not sequence

    def _updateButtons(self) -> None:
        running = self._job is not None
        self.runButton.enabled = not running
        self.cancelButton.enabled = running
        self.taskComboBox.enabled = not running

    # ------------------------------------------------------------------------------------------- running
    def createJob(self):
        """The job for the current choices (raises InputError for bad input, before anything starts)."""
        from DeepRegistrationSlicerLib import sequences

        options = sequences.workflowOptions(self.parameterNodeGetter())
        if self.task == "sequence":
            sequence = self.sequenceSelector.currentNode()
            choice = sequences.REFERENCE_CHOICES[min(max(int(self.referenceComboBox.currentIndex), 0), 2)]
            reference = sequences.referenceItem(choice, sequence) if sequence is not None else 0
            return sequences.SequenceJob(sequence, reference=reference, chain=bool(self.chainCheckBox.checked),
                                         **options)
        return sequences.TemplateJob(list(self.volumesSelector.checkedNodes()),
                                     templateIterations=int(self.passesSpinBox.value), **options)

    def onRun(self) -> None:
        if self._job is not None:
            return
        self.lastResult = None
        try:
            with slicer.util.tryWithErrorDisplay(_("The run could not start."), waitCursor=True):
                self._job = self.createJob().start()
        except Exception as exc:  # shown by tryWithErrorDisplay; the label keeps it
            self.statusLabel.text = str(exc)
            self._job = None
            return
        finally:
            self._updateButtons()
        self.progressBar.value = 0
        self.progressBar.setFormat(_("starting") + " (%p%)")
        self.progressBar.show()
        self.statusLabel.text = _("Running in the background; you can keep working.")
        self._timer.start()

    def onCancel(self) -> None:
        if self._job is not None:
            self.cleanup()
            self.statusLabel.text = _("Cancelled; nothing was changed.")

    def cleanup(self) -> None:
        """Stops the timer and the running job, if any (returns at once; the module's cleanup calls it)."""
        self._timer.stop()
        if self._job is not None:
            self._job.cancel()
            self._job = None
        self.progressBar.hide()
        self._updateButtons()

    def onPoll(self) -> None:
        job = self._job
        if job is None:
            self._timer.stop()
            return
        status = job.poll()
        self.progressBar.value = int(round(100 * status.progress))
        self.progressBar.setFormat(f"{status.message} (%p%)")
        if not status.finished:
            return
        self._timer.stop()
        self._job = None
        self.progressBar.hide()
        try:
            if status.state == "failed":
                self.statusLabel.text = _("Failed: {message}").format(message=status.message)
                slicer.util.errorDisplay(self.statusLabel.text)
            elif status.state == "done":
                from DeepRegistrationSlicerLib import sequences

                try:
                    with slicer.util.tryWithErrorDisplay(_("The results could not be loaded."), waitCursor=True):
                        self.lastResult = job.loadResults()
                except Exception as exc:
                    self.statusLabel.text = str(exc)
                    return
                self.statusLabel.text = sequences.resultSummary(self.lastResult)
        finally:
            self._updateButtons()


def addWorkflowSection(moduleWidget) -> WorkflowSection:
    """Adds the section to a module widget's ``layout``; it reads the widget's ``_parameterNode`` when Run is
    clicked. Returns the section (call its ``cleanup()`` from the widget's ``cleanup()``)."""
    return WorkflowSection(moduleWidget.layout, lambda: getattr(moduleWidget, "_parameterNode", None))
