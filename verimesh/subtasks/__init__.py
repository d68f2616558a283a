"""Sub-tasks: one job run as segments by several nodes, verified as a chain, with a receipt."""
