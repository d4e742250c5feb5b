"""The distillation engine: a library (core, data, teachers, training, evaluation) under thin commands.

Commands (each module here is argparse + main, over the library): ``python -m engine.train``, ``engine.precompute``,
``engine.store``, ``engine.eval``, ``engine.export``, ``engine.synthetic``, ``engine.teacher``, ``engine.ablate``.
The library never parses flags or exits: it raises ``engine.core.errors.UserError`` for anything a user can fix,
and ``engine.cli.run_command`` turns that into one line and exit status 2. The README's "Architecture" section
says what flows between the parts.
"""
