"""wanmoe: video generation with noise experts (the Wan2.2 design).

Importing the package has no side effects (STYLE.md 8): no environment changes, no directories made.
"""

__version__ = "0.1.0"
