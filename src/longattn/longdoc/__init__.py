"""Long-document tasks: retrieval and classification on the ScanCode LicenseDB (``longattn longdoc``).

The data layer (``licensedb``, ``tasks``) needs only PyYAML; the systems need the ``longdoc`` extra
(licensedcode-data, bm25s, the real all-MiniLM-L6-v2 weights, transformers).
"""

from .licensedb import License, LicenseDB, LicenseDBError, Rule, load_licensedb
from .tasks import ClassificationTask, Query, RetrievalTask, classification_task, retrieval_task

__all__ = ["ClassificationTask", "License", "LicenseDB", "LicenseDBError", "Query", "RetrievalTask", "Rule",
           "classification_task", "load_licensedb", "retrieval_task"]
