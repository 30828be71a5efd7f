"""COCO-format data without Ray: reading and validation (``coco``), image decoding (``images``),
where a config's data lives (``sources``), synthetic shapes (``synthetic``), the transforms and the
batch preprocessing that Ray Data runs on CPU nodes (``transforms``, ``preprocess``)."""
