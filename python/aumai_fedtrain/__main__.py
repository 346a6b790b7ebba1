"""``python -m aumai_fedtrain`` runs the CLI."""

from aumai_fedtrain.cli import main

main()
