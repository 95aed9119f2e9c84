"""CLI commands, one module each.

Every module here defines ``NAME`` (the command path, e.g. ``"data check"``), ``HELP`` (one line),
``add_arguments(parser)`` and ``main(args) -> int``. ``qlora_med.cli`` discovers them, so adding a
command never means editing the CLI module.
"""
