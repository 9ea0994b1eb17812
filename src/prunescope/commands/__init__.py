"""One module per CLI subcommand (see prunescope.cli)."""
