"""Teachers: the embedding store (``store``, with its ``manifest`` and ``parts``) and its builder (``precompute``),
the shipped default teacher (``default``), and the sources the training task reads teacher rows from (``sources``).
A new teacher source implements ``sources.TeacherSource``."""
