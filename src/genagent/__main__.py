"""``python -m genagent`` runs the command line."""

from genagent.cli import main

main()
