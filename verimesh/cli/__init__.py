"""Layer 8, the ``verimesh`` command line: the root group and its error boundary (``app``,
the one place where exceptions become exit codes), the options every command shares
(``common``), and one module per command group.

May import: every layer. Commands parse, call one library function, and render.
"""
