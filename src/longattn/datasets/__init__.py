"""Data sets that applications share: generators and readers of their official file formats.

``listops``: ListOps expressions, their value and a generator of LRA's TSV files; ``pathfinder``: Pathfinder /
Path-X images in the release layout, read and generated (``pathfinder_draw`` draws them); ``files``: finding
release files and reporting what is missing or malformed. LRA (``lra.tasks``) reads them as token sequences,
``vision`` as pictures; nothing is downloaded.
"""

from .files import SPLITS, DataFormatError, MissingDataError
from .listops import ListOpsSettings, generate_examples
from .pathfinder import PathfinderData, PathfinderImages, PathfinderSettings

__all__ = ["SPLITS", "DataFormatError", "ListOpsSettings", "MissingDataError", "PathfinderData", "PathfinderImages",
           "PathfinderSettings", "generate_examples"]
