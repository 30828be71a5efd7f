"""Ray Data stages: COCO -> Parquet ingest (``ingest``), the preprocessing pipeline that feeds Ray
Train (``pipeline``), and batch prediction over a folder or a dataset (``batch_predict``)."""
