"""COCO-format data without Ray: reading and validation (``coco``), image decoding (``images``),
where a config's data lives (``sources``), which dataset a run started on (``identity``), what an
ingest is made of, as its rerun compares it (``ingest_input``), synthetic shapes (``synthetic``),
the transforms and the batch preprocessing that Ray Data runs on CPU nodes (``transforms``,
``preprocess``)."""
