"""dockpart: a small self-scaling web platform for one Docker host."""
