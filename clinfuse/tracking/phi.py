"""The PHI guard lives in :mod:`clinfuse.phi` (the cohort builder redacts with it too); re-exported here."""

from ..phi import PhiError, PhiGuard

__all__ = ["PhiGuard", "PhiError"]
