"""Typed errors. Library code raises these; only the CLI turns them into a message and exit code 2.

Each message names the offending input and, where there is one, the fix.
"""


class WindqError(Exception):
    """Base class: a problem with the user's input or environment, reported as one line."""


class InputError(WindqError):
    """A file or argument that does not exist or cannot be read as what it claims to be."""


class OfflineError(WindqError):
    """Something would have to be downloaded and the network is not there."""


class PlanError(WindqError):
    """A plan that does not fit the model: unknown or missing tensor, illegal type, broken budget."""


class IllegalTypeError(PlanError):
    """A ggml type that cannot be written for a tensor (row length, imatrix missing)."""


class BudgetError(PlanError):
    """A bit budget that no allowed combination of types can meet."""


class ExportError(WindqError):
    """llama.cpp's quantizer failed, or the file it wrote does not match the plan."""


class CalibrationError(WindqError):
    """Calibration or an imatrix file cannot be used (too little text, another model's imatrix)."""


class UnsupportedModelError(WindqError):
    """An architecture windq cannot handle for the requested operation."""


class RuntimeCrashError(WindqError):
    """llama.cpp died (a signal, not an exception) or hung while running a model in a child process."""
