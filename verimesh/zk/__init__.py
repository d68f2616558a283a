"""Layer 4 (a mechanism), zero-knowledge proofs with ezkl: circuit builds, the proving
worker process and proof checks (``ezkl_backend``, the only module that imports ezkl), and the
zk bundle's prove and verify (``zkmode``).

May import: ``verimesh.jobs`` and below. Not its sibling mechanisms (``spot``, ``ledger``).
"""
