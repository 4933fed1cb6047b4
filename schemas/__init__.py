# The family table first: its rows in their own modules (family_sd3, ...) import the classes
# families.py defines and register themselves there, whichever schemas module is imported first.
from sdfleet.schemas import families  # noqa: F401
