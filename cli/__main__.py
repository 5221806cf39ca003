"""`python -m cli`: the `chatbatch` command."""

from cli.main import main

main()
