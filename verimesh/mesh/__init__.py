"""The live mesh (docs/design.md §10): a coordinator that leases tasks to nodes over HTTP,
verifies what they send back and settles it in the ledger; the node daemon; the client."""

from verimesh.mesh.client import Client, MeshError
from verimesh.mesh.coordinator import Coordinator
from verimesh.mesh.node import Node

__all__ = ["Client", "Coordinator", "MeshError", "Node"]
