"""Command line: a thin typer app that parses, calls the layer below and prints."""
