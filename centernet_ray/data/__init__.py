"""COCO-format data: reading and validation, synthetic shapes, preprocessing transforms."""
