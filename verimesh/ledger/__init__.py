"""Layer 4 (a mechanism), the reputation ledger: the RFC 9162 event log on SQLAlchemy with
checkpoints and proofs (``store``), and standing, audit policy and slashing economics derived
from its events (``reputation``).

May import: ``verimesh.jobs`` and below. Not its sibling mechanisms (``spot``, ``zk``): the
rules that join a verdict to the ledger live above, in ``verimesh.settlement``.
"""
