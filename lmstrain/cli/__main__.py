"""``python -m lmstrain.cli``: the same as the ``lmstrain`` command."""

from lmstrain.cli import main

main()
