"""vmcri: a CRI v1 runtime in which every pod sandbox is a virtual machine."""
from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("vmcri")
except _metadata.PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+src"
