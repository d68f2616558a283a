"""Layer 4 (a mechanism), the reputation ledger: what an entry may say and who may write it
(``events``: kinds, claims, signed requests, settings), the RFC 9162 event log on SQLAlchemy with
writer-signed batches, checkpoints, proofs and the checked view decisions read (``store``), the
protocol's rules replayed over the log (``rules``), and standing, audit policy and slashing
economics derived from its events (``reputation``).

May import: ``verimesh.jobs`` and below. Not its sibling mechanisms (``spot``, ``zk``): the
rules that join a verdict to the ledger live above, in ``verimesh.settlement``, which also hands
``rules`` the evidence checker.
"""
