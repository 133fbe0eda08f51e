"""``python -m morphkit`` runs the command-line interface (also under ``torchrun -m morphkit``)."""

from morphkit.cli import main

main()
