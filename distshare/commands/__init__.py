"""The subcommands: one module each, `<name>_command_parser(subparsers)` and `<name>_command(args)`;
`common.py` holds the flags they share and the one way a command ends (files, verdict, exit code)."""
