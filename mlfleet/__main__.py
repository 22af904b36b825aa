"""``python -m mlfleet ...`` is the ``mlfleet`` command."""

from mlfleet.cli import main

main()
