"""Images from conditioning embeddings (diffusers pipelines), judged zero-shot by a CLIP model."""
