"""After training: clip_benchmark's metrics and ImageNet zero-shot (``metrics``), which checkpoint or model to
evaluate (``loading``), and the export to a plain open_clip folder (``export``)."""
