"""Qt sections of the Deep Registration module's GUI (the only DeepRegistration package that imports qt, ctk and
Slicer's Qt widgets; the logic they call lives in :mod:`DeepRegistrationSlicerLib`).

- :class:`~.section.WorkflowSection` / :func:`addWorkflowSection`: the collapsible "Sequence / template" section
  (motion correction of a volume sequence, template from a list of volumes), on
  :mod:`DeepRegistrationSlicerLib.sequences`.

The module widget adds it in its ``setup()``::

    from DeepRegistrationWidgets import addWorkflowSection
    self.workflowSection = addWorkflowSection(self)   # after self.logic and the parameter node exist

and stops it in ``cleanup()`` with ``self.workflowSection.cleanup()``.
"""
from .section import WorkflowSection, addWorkflowSection

__all__ = ["WorkflowSection", "addWorkflowSection"]
