"""Type aliases shared by the core.

The core accepts arrays of any array-API library, so arrays and namespaces are typed as
``Any``; the aliases document intent.
"""

from __future__ import annotations

from typing import Any, TypeAlias

__all__ = ["Array", "Namespace"]

Array: TypeAlias = Any
Namespace: TypeAlias = Any
