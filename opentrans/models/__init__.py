"""open_clip loading, the open-vocabulary segmentor, its artifacts and text embeddings."""
