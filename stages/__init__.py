"""The training stages Apogee runs, each a `engine.stage.Stage` (stages/registry.py lists them).

Stages depend on the engine and never the reverse; one stage never imports another.
"""
