"""Storage every layer shares: atomic files and directories with manifests, and the run directory's layout."""
