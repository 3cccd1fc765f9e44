"""CLI subcommands, one module each (dispatched from jaxinfer.cli)."""
