"""The jaxspec command line: one module per subcommand, listed in main.py."""
