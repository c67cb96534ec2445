"""hallu: the VLM hallucination-reduction loop in one command line.

Importing this package is cheap on purpose (no torch, no transformers): the CLI answers ``--help``
instantly and heavy libraries are imported inside the functions that need them.
"""

__version__ = "0.1.0"
