"""`python -m consoleproxy`: the same CLI as the `consoleproxy` command (used by `serve --workers`)."""

from .cli import main

raise SystemExit(main())
