"""alnus: deep-learning prediction of axillary lymph node metastasis from breast ultrasound."""

from __future__ import annotations

from alnus.errors import AlnusError

__version__ = "0.1.0"
__all__ = ["AlnusError", "__version__"]
