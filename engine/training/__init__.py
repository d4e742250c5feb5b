"""Training: the run configuration (``config``), its inputs resolved and checked (``prepare``), what a step changes
(``state``), one step (``step``, with GradCache in ``gradcache``), the task from a batch to the loss terms
(``task``), resuming (``resume``) and the loop (``loop.run``); the default teacher's recipe (``default_teacher``)
and the ablation (``ablation``) are runs of that loop."""
