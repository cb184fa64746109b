"""LoRA references, downloads, file layouts and exact merging. Knows nothing of pipelines."""
