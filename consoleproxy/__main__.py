"""`python -m consoleproxy`: the same CLI as the `consoleproxy` command (used by `serve --workers`)."""

from consoleproxy.tools.cli import main

raise SystemExit(main())
