"""The exception names lamindb's test modules import."""


class ValidationError(ValueError):
    """Stand-in for ``lamindb.errors.ValidationError``."""


class FieldValidationError(ValueError):
    """Stand-in for ``lamindb.errors.FieldValidationError``."""
