"""Layer 2, identity and signatures: BLS12-381 keys and key files (``keys``, backends in
``_bls``), DSSE envelopes carrying in-toto statements (``envelope``).

May import: ``verimesh.core`` and ``verimesh.errors``.
"""
