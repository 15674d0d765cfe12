"""dockpart: a small self-scaling web platform for one Docker host."""

from __future__ import annotations
