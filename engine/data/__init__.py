"""Data: webdataset shards streamed per rank and worker with exact resume (``shards``), a fast tar reader
(``tario``), the procedural dataset (``synthetic``) and where the embedded default lives in the cache
(``embedded``). A new data format goes here: something that yields raw samples ({"__key__", member bytes}) for
``shards.Codec`` to decode."""
