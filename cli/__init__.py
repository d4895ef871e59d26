"""The `apogee` command: every subcommand's options and front end, above the stages and the engine.

cli/ sits at the top of the import graph (docs/ARCHITECTURE.md): it may import every other part,
and nothing imports it. Each module holds one command's argparse and the few lines that turn
its options into a call of the product (and its errors into exit status 2).
"""
