"""The hospital loop: studies from a PACS (DICOMweb), results back into it (DICOM SR + SC), FHIR out.

- :class:`PacsClient`: QIDO-RS / WADO-RS / STOW-RS with credentials from the environment;
- :func:`pull`: studies into an export folder that ``clinfuse cohort build`` reads;
- :func:`run_studies`: retrieve -> ``clinfuse.Model`` predict + explain -> SR, SC, FHIR -> STOW-RS;
- :class:`StudyListener`: a DICOM storage SCP (``pynetdicom``) that predicts studies pushed to it;
- :class:`LocalOrthanc`: a throw-away Orthanc on loopback (tests, benchmark, trying it out).

Needs the ``pacs`` extra (``pip install 'clinfuse[pacs]'``: highdicom, dicomweb-client, pynetdicom,
fhir.resources). docs/pacs.md says how to point it at a hospital's PACS.
"""

from .client import PacsClient, PacsCredentials, PacsError
from .orthanc import LocalOrthanc
from .pull import PullResult, pull
from .run import RunSummary, StudyResult, run_studies

__all__ = ["PacsClient", "PacsCredentials", "PacsError", "LocalOrthanc", "pull", "PullResult", "run_studies",
           "RunSummary", "StudyResult", "StudyListener"]


def __getattr__(name):
    if name == "StudyListener":
        from .listen import StudyListener

        return StudyListener
    raise AttributeError(name)
