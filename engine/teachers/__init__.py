"""Teachers: the embedding store (``store``, with its ``manifest`` and ``parts``; a reinforced store's views and
captions in ``reinforced``, their check in ``viewcheck``) and its builder (``precompute``), the shipped default
teacher (``default``), and the sources the training task reads teacher rows from (``sources``). A new teacher source
implements ``sources.TeacherSource``."""
