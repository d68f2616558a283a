"""Layer 4 (a mechanism), spot-check proofs: running steps and committing to the trace,
verifier-side sampling and re-checks (``spotcheck``), and evidence files that prove a signed
wrong result (``evidence``).

May import: ``verimesh.jobs`` and below. Not its sibling mechanisms (``zk``, ``ledger``).
"""
