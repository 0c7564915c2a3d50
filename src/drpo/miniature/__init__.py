"""Building and training the miniature world's models (VAE, latent MAE, CLIP reward, base generator)."""
